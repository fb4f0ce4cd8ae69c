"""Adapters of the published GMoE code (BAI-LAB/GMoE on mLoRA 0.3.2, `routing_strategy: "goe"`):
`from_published_gmoe`, which loads one onto the graph router, and `published_expert_graph`, the
expert graph that code rebuilds at load time. `from_gmoe_reference` is its former name, kept
for one release as a deprecated alias.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GMoEModel
from ..topology import warn_if_twins
from ._common import (_attention_specs, _build, _check_activation, _check_keys, _expert_lora,
                      _expert_specs, _get, _layers, _lora_settings, _make_config, _read_config,
                      _read_weights, _Spec, _split_targets)

# mLoRA names of the expert projections -> this package's, in the order messages list them
MLORA_EXPERT_NAMES = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}
HF_TO_MLORA = {hf: ml for ml, hf in MLORA_EXPERT_NAMES.items()}


def published_expert_graph(expert_features: torch.Tensor, expert_weight: torch.Tensor, act_fn,
                           edges_threshold: float) -> torch.Tensor:
    """The expert graph the published GMoE code builds when it loads an adapter.

    Node features act(W_exp X) (fp32); cosine similarity over all E x E ordered pairs, diagonal
    included; a threshold y starting at 1.0 and lowered by 0.01 until the fraction of pairs with
    |sim| >= y reaches `edges_threshold`. Returns those pairs as an (E, E) bool adjacency with the
    diagonal cleared (self-loops come from the GCN normalisation anyway). |cos| is symmetric, so
    is the result, up to rounding of the similarity matrix, which is kept as it comes.
    """
    if not 0.0 < edges_threshold <= 1.0:
        raise ValueError(f"edges_thresholds={edges_threshold!r} must be in (0, 1]: the published code "
                         "never stops (> 1) or builds no graph at all (<= 0) otherwise")
    num_experts = expert_features.shape[0]
    with torch.no_grad():
        nodes = act_fn(F.linear(expert_features.float(), expert_weight.float()))
        unit = F.normalize(nodes, p=2, dim=1)
        similarity = (unit @ unit.t()).abs()
        threshold, fraction, mask = 1.0, 0.0, None
        while fraction < edges_threshold:
            if threshold < -1.0:
                raise ValueError("the expert features give NaN similarities; the adapter is corrupt")
            mask = similarity >= threshold
            fraction = mask.sum().item() / (num_experts * num_experts)
            threshold -= 0.01
    adjacency = mask.clone()
    adjacency.fill_diagonal_(False)
    return adjacency


def _layer_threshold(thresholds, index: int, where: Path) -> float:
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        return float(thresholds)
    # The published code reads one threshold per group of 8 layers: edges_thresholds[i // 8].
    if isinstance(thresholds, list) and index // 8 < len(thresholds) and \
            isinstance(thresholds[index // 8], (int, float)) and not isinstance(thresholds[index // 8], bool):
        return float(thresholds[index // 8])
    raise ValueError(f"{where}: edges_thresholds={thresholds!r} gives no threshold for layer {index} "
                     "(a number, or a list with one number per group of 8 layers)")


def from_published_gmoe(hf_model: nn.Module, path: str | os.PathLike, backend: str | None = None) -> GMoEModel:
    """Load an adapter written by the published GMoE code (BAI-LAB/GMoE, mLoRA 0.3.2) onto `hf_model`.

    `hf_model` must be the base model it was trained on. The expert graph is rebuilt from the
    adapter's weights exactly as that code does at load time (`published_expert_graph`) and then
    stored with the adapter; twins in it are reported with a warning. Returns a GMoEModel with
    trainable adapters in `hf_model`'s current train/eval mode.

    Config mapping: r, lora_alpha (rsLoRA folded into lora_alpha), lora_dropout; num_gcnlayer ->
    gcn_layers; dim_gcn -> gcn_dim; router_route_loss_coef_ -> poisson_loss_coef and
    router_count_loss_coef_ -> normal_loss_coef (balance_strategy "goe", the default when
    missing); balance_strategy "mixtral" -> aux_loss_coef (the Switch loss, which the published
    code computes on probabilities softmaxed a second time); router_loss false -> no router loss;
    edges_thresholds (a fraction of all E x E pairs, diagonal included) -> the equivalent fraction
    of off-diagonal pairs in edge_density (informational: the graph itself is loaded).

    Outputs are those of the published forward without LoRA dropout. (mLoRA applies LoRA dropout
    at inference too: `F.dropout` without a training flag for the attention LoRA, and expert LoRA
    modules that no eval() reaches; with its lora_dropout of 5e-4 the difference is that noise.)
    """
    folder, raw, where = _read_config(path)
    peft_type = raw.get("peft_type")
    strategy = raw.get("routing_strategy")
    if strategy != "goe" or peft_type not in (None, "MIXLORA"):
        hint = " (a mixlora-package adapter: use gmoe.convert.from_mixlora)" if strategy == "mixlora" else ""
        raise ValueError(f"{where} has peft_type={peft_type!r}, routing_strategy={strategy!r}: not an adapter "
                         f"of the published GMoE code, which writes routing_strategy 'goe'{hint}")
    layers, config, per_layer, top = _published_config(hf_model, raw, where)
    weights, source = _read_weights(folder)
    specs = _published_specs(layers, config, top)
    _check_keys(weights, specs, source, hf_model, len(layers))
    for spec in specs:
        if spec.src.endswith(("gate.lamb", "gate.theta")) and not weights[spec.src].item() > 0:
            raise ValueError(f"{source}: {spec.src} = {weights[spec.src].item()} must be positive")
    # the graph, as the published code rebuilds it at load
    extra = {}
    for layer, threshold in zip(layers, per_layer):
        pre = f"mixlora.layers.{layer.index}.gate."
        adjacency = published_expert_graph(weights[pre + "X"], weights[pre + "mlp_struct.weight"],
                                           layer.mlp.act_fn, threshold)
        extra[f"{layer.mlp_name}.router.expert_adjacency"] = adjacency
        warn_if_twins(adjacency, f"published GMoE adapter {folder}, layer {layer.index}")
    return _build(hf_model, config, weights, specs, extra, source, backend)


def _published_config(hf_model, raw: dict, where: str):
    """(layers, GMoEConfig, each layer's edge threshold, the attention LoRA settings) of a published config."""
    num_experts = _get(raw, "num_experts", where, (int, list))
    if isinstance(num_experts, list):
        if not num_experts or any(n != num_experts[0] for n in num_experts):
            raise ValueError(f"{where}: num_experts={num_experts} differs across layers; this package has "
                             "one number of experts per adapter")
        num_experts = num_experts[0]
    top_k = _get(raw, "top_k", where, (int,), 3)  # the published defaults where a field is absent
    gcn_layers = _get(raw, "num_gcnlayer", where, (int,), 3)
    gcn_dim = _get(raw, "dim_gcn", where, (int,), 128)
    thresholds = _get(raw, "edges_thresholds", where, (int, float, list))
    balance = _get(raw, "balance_strategy", where, (str,), "goe")
    router_loss = _get(raw, "router_loss", where, (bool,), True)
    route_coef = _get(raw, "router_route_loss_coef_", where, (int, float), 0.01)
    count_coef = _get(raw, "router_count_loss_coef_", where, (int, float), 0.01)
    if balance not in ("goe", "mixtral"):
        raise ValueError(f"{where}: balance_strategy={balance!r} is not supported with the graph router "
                         "(the published code computes a loss only for 'goe' and 'mixtral')")
    coefs = dict(poisson_loss_coef=0.0, normal_loss_coef=0.0, aux_loss_coef=0.0)
    if router_loss and balance == "goe":
        coefs.update(poisson_loss_coef=float(route_coef), normal_loss_coef=float(count_coef))
    elif router_loss:
        coefs.update(aux_loss_coef=float(route_coef))

    attention, experts = _split_targets(raw, where, MLORA_EXPERT_NAMES, "the published GMoE code")
    top = _lora_settings(raw, where, "the adapter")
    lora = _expert_lora(raw, where, top, bool(attention), honoured=True)
    layers = _layers(hf_model, attention)
    _check_activation(raw, where, hf_model, layers[0].mlp)
    per_layer = [_layer_threshold(thresholds, layer.index, where) for layer in layers]
    E = num_experts
    nominal = [min(1.0, max(0.0, (t * E * E - E) / (E * (E - 1)))) if E > 1 else 0.0 for t in per_layer]
    config = _make_config(
        where, num_experts=E, top_k=top_k, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        router="graph", gcn_layers=gcn_layers, gcn_dim=gcn_dim, edge_density=sum(nominal) / len(nominal),
        target_modules=attention, expert_modules=experts,
        base_model_name_or_path=raw.get("base_model_name_or_path") or None, **coefs)
    return layers, config, per_layer, top


def _published_specs(layers, config, top) -> list[_Spec]:
    """Where every tensor of the published adapter goes in ours, layer by layer."""
    E, G = config.num_experts, config.gcn_dim
    specs: list[_Spec] = []
    for layer in layers:
        pre = f"mixlora.layers.{layer.index}."
        hidden = layer.mlp.gate_proj.in_features
        router = f"{layer.mlp_name}.router."
        specs += [
            _Spec(pre + "gate.X", ((E, hidden),), router + "expert_features"),
            _Spec(pre + "gate.mlp.weight", ((G, hidden),), router + "token_weight"),
            _Spec(pre + "gate.mlp_struct.weight", ((G, hidden),), router + "expert_weight"),
            _Spec(pre + "gate.proj.weight", ((1, G),), router + "score_weight", None, lambda t: t.reshape(-1)),
            _Spec(pre + "gate.lamb", ((), (1,)), router + "poisson_rate", None, lambda t: t.reshape(1)),
            _Spec(pre + "gate.theta", ((1,), ()), router + "normal_std", None, lambda t: t.reshape(1)),
        ]
        specs += [_Spec(pre + f"gate.convs.{l}.lin.weight", ((G, G),), router + "gcn_weight", l)
                  for l in range(config.gcn_layers)]
        specs += _expert_specs(layer, config.expert_modules, E, config.r,
                               lambda proj, e, pre=pre: pre + f"experts.{e}.{HF_TO_MLORA[proj]}")
        specs += _attention_specs(layer, config.target_modules, top.r)
    return specs


def from_gmoe_reference(hf_model: nn.Module, path: str | os.PathLike, backend: str | None = None) -> GMoEModel:
    """Deprecated name of `from_published_gmoe` (same arguments and result); warns, and will be
    removed in the next release."""
    warnings.warn("gmoe.convert.from_gmoe_reference is deprecated: use gmoe.convert.from_published_gmoe",
                  DeprecationWarning, stacklevel=2)
    return from_published_gmoe(hf_model, path, backend)
