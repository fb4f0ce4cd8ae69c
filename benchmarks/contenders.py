"""Every contender, built from one shared set of weights and inputs per case.

A `Problem` holds the frozen FFN, E stacked LoRA experts, both routers' weights, the input x
and one routing (indices, weights) for a Case. Each contender reads those same tensors (PEFT
and MixLoRA get copies of them in their own modules), so every row of a case computes on
identical shapes, weights and inputs:

  ffn:    gmoe-triton, gmoe-reference, loop, peft-lora (expert 0's LoRA on gate/up/down),
          dense-frozen, mixlora (forward only, its own MixLoraSparseMoe on the same experts;
          its gate is the `linear` router's weight, so it picks the same experts)
  router: graph-triton, graph-reference, graph-pyg (GCNConv over a block-diagonal graph of
          T·(E+1) nodes, the published approach), linear
  step:   see `step_contenders`.

A contender that cannot run here (no CUDA, module missing, package absent, or it raised) is
returned with `error` set, so the report shows why instead of dropping the row.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import tempfile
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gmoe_kernels import functional
from gmoe_kernels.activations import act
from gmoe_kernels.reference import expert_ffn_loop, normalized_adjacency, topk_route

from .shapes import Case, StepModel

FFN_IMPLS = ("gmoe-triton", "gmoe-reference", "loop", "peft-lora", "dense-frozen", "mixlora")
ROUTER_IMPLS = ("graph-triton", "graph-reference", "graph-pyg", "linear")
STEP_IMPLS = ("gmoe-triton", "gmoe-reference", "loop", "peft-lora", "dense-frozen", "mixlora",
              "gmoe-converted")
# Run only when asked by name (--impls, micro-benchmarks): lora-plain stands in for peft-lora
# when PEFT is not installed (the same LoRA maths in plain PyTorch); graph-loop is the
# per-token oracle `graph_router_loop` (a Python loop over tokens: slow by design).
EXTRA_IMPLS = {"ffn": ("lora-plain",), "router": ("graph-loop",), "step": ("lora-plain",)}
LORA_KEYS = ("lora_a_gate", "lora_b_gate", "lora_a_up", "lora_b_up", "lora_a_down", "lora_b_down")


@dataclass
class Contender:
    """One implementation of one op on one case.

    forward() runs the op (recording autograd unless inference_only) and returns a tuple of
    output tensors; fwd_bwd() runs forward then the backward into `leaves` with fixed
    upstream gradients. `persistent` tensors (weights, inputs) are left out of saved bytes.
    """
    impl: str
    op: str
    forward: Callable[[], tuple] | None = None
    leaves: list = field(default_factory=list)
    grads: Callable[[tuple], tuple] | None = None     # outputs -> upstream gradients
    persistent: list = field(default_factory=list)
    inference_only: bool = False
    error: str | None = None
    note: str = ""
    model: nn.Module | None = None   # step contenders: the model, for the agreement check

    def fwd(self):
        if self.inference_only:
            with torch.no_grad():
                return self.forward()
        return self.forward()

    def fwd_bwd(self):
        outs = self.forward()
        torch.autograd.grad(outs, self.leaves, self.grads(outs))


def unavailable(impl, op, why) -> Contender:
    return Contender(impl, op, error=why)


def triton_missing(op_name: str, device: torch.device) -> str | None:
    """Why the Triton backend of `op_name` cannot be timed here (None when it can)."""
    if device.type != "cuda":
        return "needs a CUDA device"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the interpreter is never timed"
    try:
        import gmoe_kernels.triton as triton_ops
    except Exception as err:  # noqa: BLE001 - report any import failure
        return f"gmoe_kernels.triton does not import ({type(err).__name__}: {err})"
    if not hasattr(triton_ops, op_name):
        return f"gmoe_kernels.triton has no {op_name} yet"
    return None


def package_missing(name: str) -> str | None:
    return None if importlib.util.find_spec(name) is not None else f"package {name!r} not installed"


# --------------------------------------------------------------------------- shared weights
@dataclass
class Problem:
    case: Case
    x: torch.Tensor                 # (T, H), requires grad
    frozen: dict                    # gate_weight (F,H), up_weight (F,H), down_weight (H,F)
    lora: dict                      # LORA_KEYS -> (E, ., .), trainable
    router: dict                    # graph router weights (see functional.graph_router)
    expert_adjacency: torch.Tensor  # (E, E) bool
    linear_weight: torch.Tensor     # (E, H) the linear router / MixLoRA gate
    indices: torch.Tensor           # (T, K) int64: top-K of softmax(x W_lin^T)
    weights: torch.Tensor           # (T, K) fp32, requires grad
    dy: torch.Tensor                # (T, H) upstream gradient of the FFN output
    scaling: float
    activation: str


def ring_adjacency(num_experts: int) -> torch.Tensor:
    """A fixed ring of expert–expert edges (density 2/(E-1)): never twins for E >= 4."""
    adj = torch.zeros(num_experts, num_experts, dtype=torch.bool)
    if num_experts >= 3:
        i = torch.arange(num_experts)
        adj[i, (i + 1) % num_experts] = True
        adj[(i + 1) % num_experts, i] = True
    return adj


def make_problem(case: Case, device, dtype, seed: int = 0) -> Problem:
    s, v = case.shape, case.variant
    T, H, Fd, E, K, R, G, L = s.tokens, s.hidden, s.inter, v.experts, v.top_k, v.rank, s.gcn_dim, s.gcn_layers
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, grad=False, dt=dtype):
        t = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    x = rand(T, H, grad=True)
    frozen = dict(gate_weight=rand(Fd, H, scale=H ** -0.5), up_weight=rand(Fd, H, scale=H ** -0.5),
                  down_weight=rand(H, Fd, scale=Fd ** -0.5))
    lora = dict(lora_a_gate=rand(E, R, H, scale=H ** -0.5, grad=True),
                lora_b_gate=rand(E, Fd, R, scale=0.02, grad=True),
                lora_a_up=rand(E, R, H, scale=H ** -0.5, grad=True),
                lora_b_up=rand(E, Fd, R, scale=0.02, grad=True),
                lora_a_down=rand(E, R, Fd, scale=Fd ** -0.5, grad=True),
                lora_b_down=rand(E, H, R, scale=0.02, grad=True))
    expert_adjacency = ring_adjacency(E)
    router = dict(token_weight=rand(G, H, scale=H ** -0.5, grad=True),
                  expert_weight=rand(G, H, scale=H ** -0.5, grad=True),
                  expert_features=rand(E, H, scale=H ** -0.5),
                  adjacency=normalized_adjacency(expert_adjacency).to(device),
                  gcn_weight=rand(L, G, G, scale=G ** -0.5, grad=True),
                  score_weight=rand(G, scale=G ** -0.5, grad=True))
    linear_weight = rand(E, H, scale=0.02, grad=True)
    with torch.no_grad():
        probs = torch.softmax((x @ linear_weight.t()).float(), dim=-1)
        indices, weights = topk_route(probs, K)
    return Problem(case, x, frozen, lora, router, expert_adjacency.to(device), linear_weight,
                   indices, weights.requires_grad_(True), rand(T, H), 2.0, s.activation)


# --------------------------------------------------------------------------- FFN contenders
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
    config = peft.LoraConfig(r=R, lora_alpha=p.scaling * R, lora_dropout=0.0,
                             target_modules=["gate_proj", "up_proj", "down_proj"])
    module = peft.inject_adapter_in_model(config, GatedFFN(p))
    with torch.no_grad():  # expert 0's LoRA: a plain LoRA of the same rank on the same weights
        for proj, suffix in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            layer = getattr(module, proj)
            layer.lora_A["default"].weight.copy_(p.lora[f"lora_a_{suffix}"][0])
            layer.lora_B["default"].weight.copy_(p.lora[f"lora_b_{suffix}"][0])
    module.to(p.x.dtype)
    lora_params = [t for n, t in module.named_parameters() if "lora_" in n]
    return Contender("peft-lora", "ffn", forward=lambda: (module(p.x),), leaves=[p.x, *lora_params],
                     grads=lambda outs: (p.dy,), persistent=[p.x, *module.parameters()])


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
                     grads=lambda outs: (p.dy,), persistent=[p.x, *w.values(), *lora.values()],
                     note="stand-in for peft-lora: the same LoRA maths in plain PyTorch")


def _dense_ffn(p: Problem) -> Contender:
    def forward():
        g = F.linear(p.x, p.frozen["gate_weight"])
        u = F.linear(p.x, p.frozen["up_weight"])
        return (F.linear(act(p.activation, g) * u, p.frozen["down_weight"]),)
    return Contender("dense-frozen", "ffn", forward=forward, leaves=[p.x],
                     grads=lambda outs: (p.dy,), persistent=[p.x, *p.frozen.values()])


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
        for proj, suffix in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            lora = LoraLinear(getattr(base, proj), config,
                              (p.lora[f"lora_a_{suffix}"][e].detach(), p.lora[f"lora_b_{suffix}"][e].detach()))
            moe.experts_[f"experts.{e}.{proj}"] = lora.eval()
    moe.eval()
    x3 = p.x.detach()[None]
    return Contender("mixlora", "ffn", forward=lambda: (moe(x3)[0],), inference_only=True,
                     note="inference only (forward, no_grad); includes its linear gate")


def ffn_contenders(p: Problem, impls=FFN_IMPLS) -> list[Contender]:
    out = []
    device = p.x.device
    persistent = [p.x, p.indices, p.weights, *p.frozen.values(), *p.lora.values()]
    leaves = [p.x, p.weights, *p.lora.values()]
    for impl in impls:
        try:
            if impl == "gmoe-triton":
                why = triton_missing("expert_mix", device)
                c = unavailable(impl, "ffn", why) if why else Contender(
                    impl, "ffn", forward=_gmoe_ffn(p, "triton"), leaves=leaves,
                    grads=lambda outs: (p.dy,), persistent=persistent)
            elif impl == "gmoe-reference":
                c = Contender(impl, "ffn", forward=_gmoe_ffn(p, "reference"), leaves=leaves,
                              grads=lambda outs: (p.dy,), persistent=persistent)
            elif impl == "loop":
                c = Contender(impl, "ffn", forward=_loop_ffn(p), leaves=leaves,
                              grads=lambda outs: (p.dy,), persistent=persistent)
            elif impl == "peft-lora":
                why = package_missing("peft")
                c = unavailable(impl, "ffn", why) if why else _peft_ffn(p)
                if why and "lora-plain" not in impls:
                    out.append(c)
                    c = _plain_lora_ffn(p)
            elif impl == "lora-plain":
                c = _plain_lora_ffn(p)
            elif impl == "dense-frozen":
                c = _dense_ffn(p)
            elif impl == "mixlora":
                why = package_missing("mixlora")
                c = unavailable(impl, "ffn", why) if why else _mixlora_ffn(p)
            else:
                raise ValueError(f"unknown ffn contender {impl!r}; known: {FFN_IMPLS}")
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - a broken contender becomes an error row
            c = unavailable(impl, "ffn", f"{type(err).__name__}: {err}")
        out.append(c)
    return out


# --------------------------------------------------------------------------- routers
def block_diagonal_edges(expert_adjacency: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """edge_index (2, T·n_edges) of T copies of the (E+1)-node token graph (token node last).

    Expert–expert edges from `expert_adjacency`, token <-> every expert both ways; GCNConv adds
    the self-loops and the symmetric normalisation itself.
    """
    E = expert_adjacency.shape[0]
    device = expert_adjacency.device
    ee = expert_adjacency.nonzero().t()
    experts = torch.arange(E, device=device)
    token = torch.full((E,), E, device=device)
    one = torch.cat([ee, torch.stack([token, experts]), torch.stack([experts, token])], dim=1)
    offsets = (torch.arange(num_tokens, device=device) * (E + 1)).repeat_interleave(one.shape[1])
    return one.repeat(1, num_tokens) + offsets


def _pyg_router(p: Problem) -> Contender:
    from torch_geometric.nn import GCNConv

    E, K = p.case.variant.experts, p.case.variant.top_k
    T, G = p.x.shape[0], p.case.shape.gcn_dim
    r = p.router
    convs = []
    for layer in range(p.case.shape.gcn_layers):
        conv = GCNConv(G, G, bias=False).to(device=p.x.device, dtype=p.x.dtype)
        with torch.no_grad():
            conv.lin.weight.copy_(r["gcn_weight"][layer])
        convs.append(conv)
    edge_index = block_diagonal_edges(p.expert_adjacency, T)  # built once, outside the timing
    name = p.activation

    def forward():
        token_nodes = act(name, p.x @ r["token_weight"].t())                        # (T, G)
        expert_nodes = act(name, r["expert_features"] @ r["expert_weight"].t())     # (E, G)
        nodes = torch.cat([expert_nodes.expand(T, E, G), token_nodes[:, None]], 1).reshape(-1, G)
        for conv in convs:
            nodes = act(name, conv(nodes, edge_index))
        logits = (nodes.view(T, E + 1, G)[:, :E] @ r["score_weight"]).float()
        probs = torch.softmax(logits, -1)
        indices, weights = topk_route(probs, K)
        return probs, weights

    leaves = [p.x, r["token_weight"], r["expert_weight"], r["score_weight"], *[c.lin.weight for c in convs]]
    return Contender("graph-pyg", "router", forward=forward, leaves=leaves, grads=_router_grads(p),
                     persistent=[p.x, *r.values(), *leaves], note="GCNConv, block-diagonal T·(E+1) graph")


def _router_grads(p: Problem):
    gen = torch.Generator().manual_seed(1)
    T, E, K = p.x.shape[0], p.case.variant.experts, p.case.variant.top_k
    gp = torch.randn(T, E, generator=gen).to(p.x.device)
    gw = torch.randn(T, K, generator=gen).to(p.x.device)
    return lambda outs: (gp.to(outs[0].dtype), gw.to(outs[1].dtype))


def _graph_router(p: Problem, backend: str) -> Contender:
    r = p.router
    K = p.case.variant.top_k

    def forward():
        logits, probs, indices, weights = functional.graph_router(
            p.x, r["token_weight"], r["expert_weight"], r["expert_features"], r["adjacency"],
            r["gcn_weight"], r["score_weight"], K, p.activation, backend=backend)
        return probs, weights

    leaves = [p.x, r["token_weight"], r["expert_weight"], r["gcn_weight"], r["score_weight"]]
    return Contender(f"graph-{backend}", "router", forward=forward, leaves=leaves,
                     grads=_router_grads(p), persistent=[p.x, *r.values()])


def _loop_router(p: Problem) -> Contender:
    from gmoe_kernels.reference import graph_router_loop

    r = p.router
    K = p.case.variant.top_k

    def forward():
        logits = graph_router_loop(p.x, r["token_weight"], r["expert_weight"], r["expert_features"],
                                   r["adjacency"].to(p.x.dtype), r["gcn_weight"], r["score_weight"],
                                   p.activation).float()
        probs = torch.softmax(logits, -1)
        indices, weights = topk_route(probs, K)
        return probs, weights

    leaves = [p.x, r["token_weight"], r["expert_weight"], r["gcn_weight"], r["score_weight"]]
    return Contender("graph-loop", "router", forward=forward, leaves=leaves, grads=_router_grads(p),
                     persistent=[p.x, *r.values()], note="one dense (E+1)-node GCN per token, in Python")


def _linear_router(p: Problem) -> Contender:
    K = p.case.variant.top_k

    def forward():
        probs = torch.softmax((p.x @ p.linear_weight.t()).float(), dim=-1)
        indices, weights = functional.topk_route(probs, K, backend="reference")
        return probs, weights

    return Contender("linear", "router", forward=forward, leaves=[p.x, p.linear_weight],
                     grads=_router_grads(p), persistent=[p.x, p.linear_weight])


def router_contenders(p: Problem, impls=ROUTER_IMPLS) -> list[Contender]:
    out = []
    for impl in impls:
        try:
            if impl == "graph-triton":
                why = triton_missing("graph_router", p.x.device)
                c = unavailable(impl, "router", why) if why else _graph_router(p, "triton")
            elif impl == "graph-reference":
                c = _graph_router(p, "reference")
            elif impl == "graph-pyg":
                why = package_missing("torch_geometric")
                c = unavailable(impl, "router", why) if why else _pyg_router(p)
            elif impl == "linear":
                c = _linear_router(p)
            elif impl == "graph-loop":
                c = _loop_router(p)
            else:
                raise ValueError(f"unknown router contender {impl!r}; known: {ROUTER_IMPLS}")
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001
            c = unavailable(impl, "router", f"{type(err).__name__}: {err}")
        out.append(c)
    return out


# --------------------------------------------------------------------------- training step
@dataclass
class StepProblem:
    name: str
    base: nn.Module          # the frozen base causal LM (never modified)
    input_ids: torch.Tensor  # (B, S)
    variant: object          # shapes.Variant
    tokens: int
    linear_params: int       # parameters of the frozen linear layers (for the floor)


def build_llama(spec: StepModel, device, dtype, seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.inter,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(2048, spec.seq), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return model.eval()


def make_step_problem(name, base, batch, seq, variant, device, seed=0) -> StepProblem:
    gen = torch.Generator().manual_seed(seed)
    vocab = base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    for p in base.parameters():
        p.requires_grad_(False)
    linear = sum(m.weight.numel() for m in base.modules() if isinstance(m, nn.Linear))
    return StepProblem(name, base, ids, variant, batch * seq, linear)


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _loss_contender(impl, model, ids, trainable, note="", patch=None) -> Contender:
    def forward():
        with (patch() if patch else contextlib.nullcontext()):
            return (model(input_ids=ids, labels=ids).loss,)
    return Contender(impl, "step", forward=forward, leaves=trainable,
                     grads=lambda outs: (torch.ones_like(outs[0]),),
                     persistent=[ids, *model.parameters(), *model.buffers()], note=note)


def _gmoe_model(sp: StepProblem, backend: str):
    from gmoe import GMoEConfig, get_gmoe_model

    v = sp.variant
    config = GMoEConfig(num_experts=v.experts, top_k=v.top_k, r=v.rank, lora_alpha=2.0 * v.rank,
                        target_modules=ATTENTION, backend=backend)
    torch.manual_seed(1)
    model = get_gmoe_model(copy.deepcopy(sp.base), config)
    with torch.no_grad():  # non-zero B so the adapter is not a no-op (same cost either way)
        for name, param in model.named_parameters():
            if name.endswith("lora_B") or name.endswith("lora_B.weight"):
                param.normal_(0.0, 0.02)
    return model.train()


def _plain_lora_model(sp: StepProblem) -> nn.Module:
    """The base model with a plain LoRA (this package's LoRALinear) on attention and MLP."""
    from gmoe.layers import LoRALinear

    model = copy.deepcopy(sp.base)
    R = sp.variant.rank
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rpartition(".")[2] in ATTENTION + MLP]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linear, R, 2.0 * R, 0.0))
    return model.train()


def _loop_patch():
    """Run GMoEMLP's experts through the published per-expert loop (router unchanged)."""
    import unittest.mock

    import gmoe.layers

    def expert_ffn(*args, lora_input=None, backend=None, **kwargs):
        return expert_ffn_loop(*args, **kwargs)

    return unittest.mock.patch.object(gmoe.layers, "functional", types.SimpleNamespace(expert_ffn=expert_ffn))


def export_mixlora_adapter(gmoe_model, sp: StepProblem, directory: str, seed: int = 2) -> None:
    """Write the GMoE model's experts and attention LoRAs as a MixLoRA adapter (plus a linear gate)."""
    from gmoe.layers import GMoEMLP, LoRALinear

    v = sp.variant
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    layers = [m for m in gmoe_model.base_model.modules() if isinstance(m, GMoEMLP)]
    hidden = layers[0].base_layer.gate_proj.in_features
    for i, layer in enumerate(layers):
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(v.experts, hidden, generator=gen) * 0.02
        for proj in MLP:
            for e in range(v.experts):
                prefix = f"mixlora.layers.{i}.mlp.{proj}.experts.{e}"
                weights[f"{prefix}.lora_A.weight"] = layer.experts[proj].lora_A[e].detach().float().cpu().clone()
                weights[f"{prefix}.lora_B.weight"] = layer.experts[proj].lora_B[e].detach().float().cpu().clone()
    attn = [(n, m) for n, m in gmoe_model.base_model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in attn:
        i = int(name.split("layers.")[1].split(".")[0])
        proj = name.rpartition(".")[2]
        prefix = f"mixlora.layers.{i}.self_attn.{proj}"
        weights[f"{prefix}.lora_A.weight"] = module.lora_A.weight.detach().float().cpu().clone()
        weights[f"{prefix}.lora_B.weight"] = module.lora_B.weight.detach().float().cpu().clone()
    config = {"base_model_name_or_path": sp.name, "task_type": "CAUSAL_LM", "peft_type": "MIXLORA",
              "r": v.rank, "lora_alpha": 2 * v.rank, "lora_dropout": 0.05, "bias": "none",
              "target_modules": ATTENTION + MLP, "routing_strategy": "mixlora",
              "act_fn": getattr(sp.base.config, "hidden_act", "silu"),
              "num_experts": v.experts, "top_k": v.top_k, "router_init_range": 0.02,
              "jitter_noise": 0.0, "router_aux_loss_coef": 0.01}
    with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    torch.save(weights, os.path.join(directory, "adapter_model.bin"))


def _mixlora_step(sp: StepProblem, adapter_dir: str) -> Contender:
    from mixlora.model import inject_adapter_in_model, load_adapter_weights

    device = sp.input_ids.device
    dtype = next(sp.base.parameters()).dtype
    config, weights = load_adapter_weights(adapter_dir, device=str(device), dtype=dtype)
    model = copy.deepcopy(sp.base)
    inject_adapter_in_model(model, config, weights)
    model.eval()  # after injection: MixLoRA's new LoraLinear modules start in training mode
    for layer in model.model.layers:  # MixLoRA keeps its experts in plain dicts: eval them by hand
        for moe in getattr(layer.mlp, "mixlora_moes", {}).values():
            moe.eval()
            for expert in moe.experts_.values():
                expert.eval()
    ids = sp.input_ids
    return Contender("mixlora", "step", forward=lambda: (model(input_ids=ids, labels=ids).loss,),
                     inference_only=True, note="inference only; linear gate; same experts as gmoe",
                     model=model)


def _converted_step(sp: StepProblem, adapter_dir: str) -> Contender:
    from gmoe.convert import from_mixlora

    backend = "auto" if sp.input_ids.device.type == "cuda" else "reference"
    converted = from_mixlora(copy.deepcopy(sp.base), adapter_dir, backend=backend)
    converted.train()
    trainable = [t for t in converted.parameters() if t.requires_grad]
    if not trainable:  # loaded for inference: make the adapter trainable for the step
        for name, t in converted.named_parameters():
            if "lora" in name or "router" in name:
                t.requires_grad_(True)
        trainable = [t for t in converted.parameters() if t.requires_grad]
    c = _loss_contender("gmoe-converted", converted, sp.input_ids, trainable,
                        note="gmoe.convert.from_mixlora of the mixlora row's adapter")
    c.model = converted
    return c


def _converted_agreement(mix: Contender, conv: Contender, ids) -> str:
    """Max |logit difference| of the converted GMoE model against MixLoRA on the same batch."""
    conv.model.eval()
    try:
        with torch.no_grad():
            want = mix.model(input_ids=ids).logits.float()
            got = conv.model(input_ids=ids).logits.float()
    finally:
        conv.model.train()
    return f"logits vs mixlora: max |diff| {(got - want).abs().max().item():.1e}"


def step_contenders(sp: StepProblem, impls=STEP_IMPLS) -> list[Contender]:
    out = []
    device = sp.input_ids.device
    ids = sp.input_ids
    gmoe_ref = None
    tmp = tempfile.TemporaryDirectory(prefix="gmoe-bench-mixlora-")
    for impl in impls:
        try:
            if impl in ("gmoe-reference", "loop", "mixlora", "gmoe-converted") and gmoe_ref is None:
                gmoe_ref = _gmoe_model(sp, "reference")
            if impl == "gmoe-triton":
                why = triton_missing("expert_mix", device) or triton_missing("graph_router", device)
                if why:
                    c = unavailable(impl, "step", why)
                else:
                    m = _gmoe_model(sp, "triton")
                    c = _loss_contender(impl, m, ids, [t for t in m.parameters() if t.requires_grad])
            elif impl == "gmoe-reference":
                c = _loss_contender(impl, gmoe_ref, ids, [t for t in gmoe_ref.parameters() if t.requires_grad],
                                    note="graph router")
            elif impl == "loop":
                c = _loss_contender(impl, gmoe_ref, ids, [t for t in gmoe_ref.parameters() if t.requires_grad],
                                    note="gmoe-reference model, experts via expert_ffn_loop", patch=_loop_patch)
            elif impl == "lora-plain" or (impl == "peft-lora" and package_missing("peft")):
                if impl == "peft-lora" and "lora-plain" not in impls:
                    out.append(unavailable(impl, "step", package_missing("peft")))
                m = _plain_lora_model(sp)
                c = _loss_contender("lora-plain", m, ids, [t for t in m.parameters() if t.requires_grad],
                                    note="stand-in for peft-lora: gmoe.layers.LoRALinear on every projection")
            elif impl == "peft-lora":
                import peft
                R = sp.variant.rank
                m = peft.get_peft_model(copy.deepcopy(sp.base), peft.LoraConfig(
                    r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules=ATTENTION + MLP))
                m.train()
                c = _loss_contender(impl, m, ids, [t for t in m.parameters() if t.requires_grad])
            elif impl == "dense-frozen":
                emb = sp.base.get_input_embeddings()(ids).detach().requires_grad_(True)

                def forward(emb=emb):
                    return (sp.base(inputs_embeds=emb, labels=ids).loss,)
                c = Contender(impl, "step", forward=forward, leaves=[emb],
                              grads=lambda outs: (torch.ones_like(outs[0]),),
                              persistent=[ids, emb, *sp.base.parameters(), *sp.base.buffers()],
                              note="frozen model, input-gradient backward")
            elif impl == "mixlora":
                why = package_missing("mixlora")
                if why:
                    c = unavailable(impl, "step", why)
                else:
                    export_mixlora_adapter(gmoe_ref, sp, tmp.name)
                    c = _mixlora_step(sp, tmp.name)
            elif impl == "gmoe-converted":
                why = package_missing("mixlora")
                if importlib.util.find_spec("gmoe.convert") is None:
                    why = "gmoe.convert not present yet"
                if why:
                    c = unavailable(impl, "step", why)
                else:
                    if not os.path.exists(os.path.join(tmp.name, "adapter_config.json")):
                        export_mixlora_adapter(gmoe_ref, sp, tmp.name)
                    c = _converted_step(sp, tmp.name)
            else:
                raise ValueError(f"unknown step contender {impl!r}; known: {STEP_IMPLS}")
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001
            c = unavailable(impl, "step", f"{type(err).__name__}: {err}")
        out.append(c)
    tmp.cleanup()  # both loaders hold the adapter in memory: the folder can go
    by_impl = {c.impl: c for c in out if c.error is None}
    if "mixlora" in by_impl and "gmoe-converted" in by_impl:
        try:
            conv = by_impl["gmoe-converted"]
            conv.note += "; " + _converted_agreement(by_impl["mixlora"], conv, ids)
        except Exception as err:  # noqa: BLE001
            by_impl["gmoe-converted"].note += f"; agreement check failed: {err}"
    return out


def step_floor_flops(sp: StepProblem, mode: str) -> float:
    """2·P·T per pass over the frozen linear layers (attention scores excluded); ×2 with backward."""
    per_pass = 2.0 * sp.linear_params * sp.tokens
    return per_pass * (2 if mode == "fwd_bwd" else 1)


def check_agreement(p: Problem, contenders: list[Contender], atol: float, rtol: float) -> dict:
    """Max |difference| of each contender's output against gmoe-reference (same function only)."""
    same_function = {"gmoe-triton", "loop", "mixlora", "graph-triton", "graph-pyg"}
    refs = {c.op: c for c in contenders if c.impl in ("gmoe-reference", "graph-reference") and c.error is None}
    report = {}
    with torch.no_grad():
        for c in contenders:
            if c.error or c.impl not in same_function or c.op not in refs:
                continue
            want = refs[c.op].forward()[0].float()
            got = c.forward()[0].float()
            err = (got - want).abs().max().item()
            tol = atol + rtol * want.abs().max().item()
            report[c.impl] = (err, err <= tol and math.isfinite(err))
    return report
