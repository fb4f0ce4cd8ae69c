"""The training-step contenders (`step_contenders`): one forward + LM loss + backward of a small
Llama built from a config (`build_llama`, `make_step_problem`) with GMoE on each backend, the
published expert loop, PEFT's LoRA (or a plain stand-in), the frozen model, MixLoRA (forward)
and GMoE loaded from MixLoRA's adapter by gmoe.convert; plus the FLOP floor of a step.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn

from gmoe_kernels.naive import expert_ffn_loop

from ..shapes import StepModel
from .common import ATTENTION, EXTRA_IMPLS, MLP, STEP_IMPLS, Contender, collect, package_missing, triton_missing, unavailable


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


def step_floor_flops(sp: StepProblem, mode: str) -> float:
    """2·P·T per pass over the frozen linear layers (attention scores excluded); ×2 with backward."""
    per_pass = 2.0 * sp.linear_params * sp.tokens
    return per_pass * (2 if mode in ("fwd_bwd", "train") else 1)


# --------------------------------------------------------------------------- models
def _loss_contender(impl, model, ids, trainable=None, note="", patch=None) -> Contender:
    """The LM loss of `model` on `ids`, backward into `trainable` (default: every parameter that
    requires grad)."""
    if trainable is None:
        trainable = [t for t in model.parameters() if t.requires_grad]

    def forward():
        with (patch() if patch else contextlib.nullcontext()):
            return (model(input_ids=ids, labels=ids).loss,)
    return Contender(impl, "step", forward=forward, leaves=trainable,
                     grads=lambda outs: (torch.ones_like(outs[0]),),
                     persistent=[ids, *model.parameters(), *model.buffers()], note=note)


#: The router options of the `gmoe-token` method (gmoe.finetune.methods) that change its cost.
TOKEN_ROUTER = dict(token_readout=True, token_init_gain=3.0)  # tests/test_token_router.py checks them


def _gmoe_model(sp: StepProblem, backend: str, router: str = "graph", **options):
    from gmoe import GMoEConfig, get_gmoe_model

    v = sp.variant
    config = GMoEConfig(num_experts=v.experts, top_k=v.top_k, r=v.rank, lora_alpha=2.0 * v.rank,
                        target_modules=ATTENTION, backend=backend, router=router, **options)
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


def _peft_model(sp: StepProblem) -> nn.Module:
    import peft

    R = sp.variant.rank
    model = peft.get_peft_model(copy.deepcopy(sp.base), peft.LoraConfig(
        r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules=ATTENTION + MLP))
    model.train()
    return model


def _loop_forward(layer, hidden_states):
    """GMoEMLP.forward with the experts run by the published per-expert loop (router unchanged,
    its routing recorded for the router losses as the layer does)."""
    base, ex = layer.base_layer, layer.experts
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    _, probs, indices, weights = layer.router(x, backend=layer.config.backend)
    layer.record_routing(probs, indices, weights)
    y = expert_ffn_loop(x, base.gate_proj.weight, base.up_proj.weight, base.down_proj.weight,
                        *(getattr(ex[name], ab) for name in MLP for ab in ("lora_A", "lora_B")),
                        indices, weights, layer.scaling, layer.activation, gate_bias=base.gate_proj.bias,
                        up_bias=base.up_proj.bias, down_bias=base.down_proj.bias)
    return y.view(*hidden_states.shape[:-1], y.shape[-1])


def _loop_patch():
    """Run GMoEMLP's experts through the published per-expert loop (router unchanged)."""
    import unittest.mock

    from gmoe.layers import GMoEMLP

    return unittest.mock.patch.object(GMoEMLP, "forward", _loop_forward)


def _dense_step(sp: StepProblem) -> Contender:
    """The frozen model, backward into the input embeddings only."""
    ids = sp.input_ids
    emb = sp.base.get_input_embeddings()(ids).detach().requires_grad_(True)

    def forward():
        return (sp.base(inputs_embeds=emb, labels=ids).loss,)
    return Contender("dense-frozen", "step", forward=forward, leaves=[emb],
                     grads=lambda outs: (torch.ones_like(outs[0]),),
                     persistent=[ids, emb, *sp.base.parameters(), *sp.base.buffers()],
                     note="frozen model, input-gradient backward")


# --------------------------------------------------------------------------- MixLoRA and gmoe.convert
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
    c = _loss_contender("gmoe-converted", converted, sp.input_ids,
                        note="gmoe.convert.from_mixlora of the mixlora row's adapter")
    c.model = converted
    return c


def _note_converted_agreement(rows: list[Contender], ids) -> None:
    """Append to the gmoe-converted row's note its max |logit difference| against the mixlora row."""
    by_impl = {c.impl: c for c in rows if c.error is None}
    if "mixlora" not in by_impl or "gmoe-converted" not in by_impl:
        return
    mix, conv = by_impl["mixlora"], by_impl["gmoe-converted"]
    try:
        conv.model.eval()
        try:
            with torch.no_grad():
                want = mix.model(input_ids=ids).logits.float()
                got = conv.model(input_ids=ids).logits.float()
        finally:
            conv.model.train()
        conv.note += f"; logits vs mixlora: max |diff| {(got - want).abs().max().item():.1e}"
    except Exception as err:  # noqa: BLE001
        conv.note += f"; agreement check failed: {err}"


# --------------------------------------------------------------------------- the contenders
def step_contenders(sp: StepProblem, impls=STEP_IMPLS) -> list[Contender]:
    device = sp.input_ids.device
    ids = sp.input_ids
    gmoe_ref = None  # built once, shared by gmoe-reference, loop and the MixLoRA adapter
    tmp = tempfile.TemporaryDirectory(prefix="gmoe-bench-mixlora-")

    def build(impl: str, rows: list) -> Contender:
        nonlocal gmoe_ref
        if impl in ("gmoe-reference", "loop", "mixlora", "gmoe-converted") and gmoe_ref is None:
            gmoe_ref = _gmoe_model(sp, "reference")
        if impl == "gmoe-triton":
            why = triton_missing("expert_mix", device) or triton_missing("graph_router", device)
            return unavailable(impl, "step", why) if why else _loss_contender(impl, _gmoe_model(sp, "triton"), ids)
        if impl == "gmoe-reference":
            return _loss_contender(impl, gmoe_ref, ids, note="graph router")
        if impl == "gmoe-linear":
            return _loss_contender(impl, _gmoe_model(sp, "reference", router="linear"), ids,
                                   note="linear router (GMoE losses), reference backend")
        if impl == "gmoe-token":
            return _loss_contender(impl, _gmoe_model(sp, "reference", **TOKEN_ROUTER), ids,
                                   note="graph router with the token readout (gmoe-token), reference backend")
        if impl == "loop":
            return _loss_contender(impl, gmoe_ref, ids, note="gmoe-reference model, experts via expert_ffn_loop",
                                   patch=_loop_patch)
        if impl == "lora-plain" or (impl == "peft-lora" and package_missing("peft")):
            if impl == "peft-lora" and "lora-plain" not in impls:
                rows.append(unavailable(impl, "step", package_missing("peft")))  # and lora-plain stands in
            return _loss_contender("lora-plain", _plain_lora_model(sp), ids,
                                   note="stand-in for peft-lora: gmoe.layers.LoRALinear on every projection")
        if impl == "peft-lora":
            return _loss_contender(impl, _peft_model(sp), ids)
        if impl == "dense-frozen":
            return _dense_step(sp)
        if impl == "mixlora":
            why = package_missing("mixlora")
            if why:
                return unavailable(impl, "step", why)
            export_mixlora_adapter(gmoe_ref, sp, tmp.name)
            return _mixlora_step(sp, tmp.name)
        if impl == "gmoe-converted":
            why = package_missing("mixlora")
            if importlib.util.find_spec("gmoe.convert") is None:
                why = "gmoe.convert not present yet"
            if why:
                return unavailable(impl, "step", why)
            if not os.path.exists(os.path.join(tmp.name, "adapter_config.json")):
                export_mixlora_adapter(gmoe_ref, sp, tmp.name)
            return _converted_step(sp, tmp.name)
        raise ValueError(f"unknown step contender {impl!r}; known: {STEP_IMPLS + EXTRA_IMPLS['step']}")

    rows = collect("step", impls, build)
    tmp.cleanup()  # both loaders hold the adapter in memory: the folder can go
    _note_converted_agreement(rows, ids)
    return rows
