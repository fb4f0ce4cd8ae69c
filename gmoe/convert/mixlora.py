"""Adapters of the `mixlora` PyPI package (0.2.x format, `peft_type: "MIXLORA"`,
`routing_strategy: "mixlora"`): `from_mixlora` loads one onto the linear router.
"""
from __future__ import annotations

import os

import torch.nn as nn

from ..config import EXPERT_MODULES
from ..model import GMoEModel
from ._common import (_attention_specs, _build, _check_activation, _check_keys, _expert_lora,
                      _expert_specs, _get, _layers, _lora_settings, _make_config, _read_config,
                      _read_weights, _Spec, _split_targets)

# mixlora names its expert projections as the Hugging Face MLP does
MIXLORA_EXPERT_NAMES = {m: m for m in EXPERT_MODULES}


def from_mixlora(hf_model: nn.Module, path: str | os.PathLike, backend: str | None = None) -> GMoEModel:
    """Load an adapter of the `mixlora` package (0.2.x format) onto `hf_model`, with the linear router.

    The result computes what `mixlora.inject_adapter_in_model` computes (softmax over the gate
    logits in fp32, top-k, weights renormalised over the k, expert e = the frozen MLP with LoRA
    on the projections listed in target_modules, scaling lora_alpha / r, attention LoRA on the
    listed attention projections); LoRA dropout only acts in training. Config mapping: r,
    lora_alpha (rsLoRA folded into lora_alpha), lora_dropout, num_experts, top_k (default 2),
    router_aux_loss_coef (default 0.001, 0 when router_loss is false) -> aux_loss_coef. A
    missing act_fn means the MLP's own activation (mixlora 0.2.3 itself fails without one).
    mixlora keeps its expert LoRAs outside the module tree, so `model.eval()` leaves their
    dropout on; compare with it after calling eval() on each `mlp.mixlora_moes[...].experts_`.

    Raises ValueError for what would compute differently here: jitter_noise > 0 (mixlora
    multiplies the MLP input by uniform noise on every forward, in eval mode too), DoRA, an
    act_fn other than the model MLP's, expert_lora settings that differ from the top level.
    """
    folder, raw, where = _read_config(path)
    peft_type = raw.get("peft_type")
    strategy = raw.get("routing_strategy")
    if peft_type != "MIXLORA" or strategy != "mixlora":
        hint = ""
        if strategy == "goe":
            hint = " (an adapter of the published GMoE code: use gmoe.convert.from_published_gmoe)"
        elif peft_type == "MIXLORA":
            hint = " (the mixlora package loads routing_strategy 'mixlora' only)"
        raise ValueError(f"{where} has peft_type={peft_type!r}, routing_strategy={strategy!r}: not a mixlora "
                         f"adapter, which has peft_type 'MIXLORA' and routing_strategy 'mixlora'{hint}")

    num_experts = _get(raw, "num_experts", where, (int,))
    top_k = _get(raw, "top_k", where, (int,), 2)
    jitter = _get(raw, "jitter_noise", where, (int, float), 0.0)
    if jitter > 0:
        raise ValueError(f"{where}: jitter_noise={jitter}: mixlora multiplies every MLP input by uniform "
                         f"noise in [1 - {jitter}, 1 + {jitter}] on every forward, in eval mode too, which "
                         "this package does not do; set jitter_noise to 0 to load the adapter without it")
    router_loss = _get(raw, "router_loss", where, (bool,), True)
    aux = _get(raw, "router_aux_loss_coef", where, (int, float), 0.001)

    attention, experts = _split_targets(raw, where, MIXLORA_EXPERT_NAMES, "mixlora")
    top = _lora_settings(raw, where, "the adapter")
    lora = _expert_lora(raw, where, top, bool(attention), honoured=False)

    layers = _layers(hf_model, attention)
    _check_activation(raw, where, hf_model, layers[0].mlp)
    config = _make_config(
        where, num_experts=num_experts, top_k=top_k, r=lora.r, lora_alpha=lora.alpha,
        lora_dropout=lora.dropout, router="linear", poisson_loss_coef=0.0, normal_loss_coef=0.0,
        aux_loss_coef=float(aux) if router_loss else 0.0, target_modules=attention, expert_modules=experts,
        base_model_name_or_path=raw.get("base_model_name_or_path") or None)

    weights, source = _read_weights(folder)
    specs: list[_Spec] = []
    for layer in layers:
        pre = f"mixlora.layers.{layer.index}."
        specs.append(_Spec(pre + "mlp.moe_gate.weight", ((num_experts, layer.mlp.gate_proj.in_features),),
                           f"{layer.mlp_name}.router.weight"))
        specs += _expert_specs(layer, experts, num_experts, lora.r,
                               lambda proj, e, pre=pre: pre + f"mlp.{proj}.experts.{e}")
        specs += _attention_specs(layer, attention, top.r)
    _check_keys(weights, specs, source, hf_model, len(layers))
    return _build(hf_model, config, weights, specs, {}, source, backend)
