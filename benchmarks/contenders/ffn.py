"""The FFN contenders of one `Problem` (`ffn_contenders`): the GMoE expert mix on each backend,
the published per-expert loop, PEFT's LoRA (or its plain-PyTorch stand-in), the frozen dense
MLP and MixLoRA's sparse MoE, all on the problem's weights.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gmoe_kernels import functional
from gmoe_kernels.activations import act
from gmoe_kernels.naive import expert_ffn_loop

from .common import FFN_IMPLS, MLP, Contender, Problem, collect, package_missing, triton_missing, unavailable

# each MLP projection and the suffix of its Problem.lora keys (lora_a_<suffix>, lora_b_<suffix>)
PROJ_SUFFIXES = (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))


def _ffn_grads(p: Problem):
    return lambda outs: (p.dy,)


def _gmoe_ffn(p: Problem, backend: str) -> Callable[[], tuple]:
    def forward():
        return (functional.expert_ffn(p.x, **p.frozen, **p.lora, indices=p.indices, weights=p.weights,
                                      scaling=p.scaling, activation=p.activation, backend=backend),)
    return forward


def _loop_ffn(p: Problem) -> Callable[[], tuple]:
    def forward():
        return (expert_ffn_loop(p.x, **p.frozen, **p.lora, indices=p.indices, weights=p.weights,
                                scaling=p.scaling, activation=p.activation),)
    return forward


class GatedFFN(nn.Module):
    """A Llama-style MLP (gate_proj, up_proj, down_proj, act) sharing the problem's frozen weights."""

    def __init__(self, p: Problem):
        super().__init__()
        H, Fd = p.case.shape.hidden, p.case.shape.inter
        dev, dt = p.x.device, p.x.dtype
        self.gate_proj = nn.Linear(H, Fd, bias=False, device=dev, dtype=dt)
        self.up_proj = nn.Linear(H, Fd, bias=False, device=dev, dtype=dt)
        self.down_proj = nn.Linear(Fd, H, bias=False, device=dev, dtype=dt)
        self.gate_proj.weight = nn.Parameter(p.frozen["gate_weight"], requires_grad=False)
        self.up_proj.weight = nn.Parameter(p.frozen["up_weight"], requires_grad=False)
        self.down_proj.weight = nn.Parameter(p.frozen["down_weight"], requires_grad=False)
        self.activation = p.activation

    def act_fn(self, g):
        return act(self.activation, g)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _peft_ffn(p: Problem) -> Contender:
    import peft

    R = p.case.variant.rank
    config = peft.LoraConfig(r=R, lora_alpha=p.scaling * R, lora_dropout=0.0, target_modules=list(MLP))
    module = peft.inject_adapter_in_model(config, GatedFFN(p))
    with torch.no_grad():  # expert 0's LoRA: a plain LoRA of the same rank on the same weights
        for proj, suffix in PROJ_SUFFIXES:
            layer = getattr(module, proj)
            layer.lora_A["default"].weight.copy_(p.lora[f"lora_a_{suffix}"][0])
            layer.lora_B["default"].weight.copy_(p.lora[f"lora_b_{suffix}"][0])
    module.to(p.x.dtype)
    lora_params = [t for n, t in module.named_parameters() if "lora_" in n]
    return Contender("peft-lora", "ffn", forward=lambda: (module(p.x),), leaves=[p.x, *lora_params],
                     grads=_ffn_grads(p), persistent=[p.x, *module.parameters()])


def _plain_lora_ffn(p: Problem) -> Contender:
    """PEFT's LoRA maths without PEFT: base(x) + s · B (A x) on gate, up and down (expert 0)."""
    lora = {k: t[0].detach().clone().requires_grad_(True) for k, t in p.lora.items()}
    s, w = p.scaling, p.frozen

    def proj(x, weight, a, b):
        return F.linear(x, weight) + s * F.linear(F.linear(x, a), b)

    def forward():
        g = proj(p.x, w["gate_weight"], lora["lora_a_gate"], lora["lora_b_gate"])
        u = proj(p.x, w["up_weight"], lora["lora_a_up"], lora["lora_b_up"])
        return (proj(act(p.activation, g) * u, w["down_weight"], lora["lora_a_down"], lora["lora_b_down"]),)
    return Contender("lora-plain", "ffn", forward=forward, leaves=[p.x, *lora.values()],
                     grads=_ffn_grads(p), persistent=[p.x, *w.values(), *lora.values()],
                     note="stand-in for peft-lora: the same LoRA maths in plain PyTorch")


def _dense_ffn(p: Problem) -> Contender:
    def forward():
        g = F.linear(p.x, p.frozen["gate_weight"])
        u = F.linear(p.x, p.frozen["up_weight"])
        return (F.linear(act(p.activation, g) * u, p.frozen["down_weight"]),)
    return Contender("dense-frozen", "ffn", forward=forward, leaves=[p.x],
                     grads=_ffn_grads(p), persistent=[p.x, *p.frozen.values()])


def _mixlora_config(p_rank, experts, top_k, dtype, scaling):
    from mixlora.config import MixLoraConfig

    return MixLoraConfig(
        base_model_="benchmark", task_type_="CAUSAL_LM", peft_type_="MIXLORA", adapter_name_="default",
        model_type_="llama", dtype_=dtype, lora_r_=p_rank, lora_alpha_=int(round(scaling * p_rank)),
        # MixLoRA's LoraLinear asserts dropout > 0; every module runs in eval mode, so it is inert.
        lora_dropout_=0.05, use_dora_=False, use_rslora_=False, lora_init_="original",
        target_modules_={"gate_proj": True, "up_proj": True, "down_proj": True},
        routing_strategy_="mixlora", num_experts_=experts, top_k_=top_k, jitter_noise_=0.0,
        router_init_range_=0.02, router_aux_loss_coef_=0.0, act_fn_=None)


def _mixlora_ffn(p: Problem) -> Contender:
    from mixlora.lora_linear import LoraLinear
    from mixlora.model import MixLoraSparseMoe

    v = p.case.variant
    base = GatedFFN(p)
    config = _mixlora_config(v.rank, v.experts, v.top_k, p.x.dtype, p.scaling)
    config.act_fn_ = base.act_fn
    moe = MixLoraSparseMoe(base, config)
    moe.gate_ = p.linear_weight.detach()
    for e in range(v.experts):
        for proj, suffix in PROJ_SUFFIXES:
            lora = LoraLinear(getattr(base, proj), config,
                              (p.lora[f"lora_a_{suffix}"][e].detach(), p.lora[f"lora_b_{suffix}"][e].detach()))
            moe.experts_[f"experts.{e}.{proj}"] = lora.eval()
    moe.eval()
    x3 = p.x.detach()[None]
    return Contender("mixlora", "ffn", forward=lambda: (moe(x3)[0],), inference_only=True,
                     note="inference only (forward, no_grad); includes its linear gate")


def ffn_contenders(p: Problem, impls=FFN_IMPLS) -> list[Contender]:
    persistent = [p.x, p.indices, p.weights, *p.frozen.values(), *p.lora.values()]
    leaves = [p.x, p.weights, *p.lora.values()]

    def expert_mix(impl, forward) -> Contender:  # gmoe-triton, gmoe-reference, loop: the same tensors
        return Contender(impl, "ffn", forward=forward, leaves=leaves, grads=_ffn_grads(p), persistent=persistent)

    def build(impl: str, rows: list) -> Contender:
        if impl == "gmoe-triton":
            why = triton_missing("expert_mix", p.x.device)
            # GMOE_EXPAND forces a token-kernel variant for the whole process: label the rows with it
            label = f"{impl}[{os.environ['GMOE_EXPAND']}]" if os.environ.get("GMOE_EXPAND") else impl
            return unavailable(label, "ffn", why) if why else expert_mix(label, _gmoe_ffn(p, "triton"))
        if impl == "gmoe-reference":
            return expert_mix(impl, _gmoe_ffn(p, "reference"))
        if impl == "loop":
            return expert_mix(impl, _loop_ffn(p))
        if impl == "peft-lora":
            why = package_missing("peft")
            if not why:
                return _peft_ffn(p)
            if "lora-plain" in impls:
                return unavailable(impl, "ffn", why)
            rows.append(unavailable(impl, "ffn", why))  # and lora-plain stands in
            return _plain_lora_ffn(p)
        if impl == "lora-plain":
            return _plain_lora_ffn(p)
        if impl == "dense-frozen":
            return _dense_ffn(p)
        if impl == "mixlora":
            why = package_missing("mixlora")
            return unavailable(impl, "ffn", why) if why else _mixlora_ffn(p)
        raise ValueError(f"unknown ffn contender {impl!r}; known: {FFN_IMPLS}")

    return collect("ffn", impls, build)
