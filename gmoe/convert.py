"""Load adapters trained elsewhere: the published GMoE code and the `mixlora` package.

- `from_gmoe_reference(model, path)`: an adapter folder written by the published GMoE code
  (BAI-LAB/GMoE on mLoRA 0.3.2; `routing_strategy: "goe"`), graph router.
- `from_mixlora(model, path)`: an adapter folder of the `mixlora` PyPI package
  (`peft_type: "MIXLORA"`, `routing_strategy: "mixlora"`), linear router.

Both read `adapter_config.json` and `adapter_model.bin` (`torch.load(weights_only=True)`),
check every key and shape before touching the model, inject GMoE into `model` and return a
normal `GMoEModel`: trainable further, saved by `save_pretrained` in this package's format.

Mapping (mLoRA names: w1 = gate_proj, w3 = up_proj, w2 = down_proj):

  published GMoE  mixlora.layers.{i}.                   this package  <mlp>. / <attn>.
  gate.mlp.weight            (G, H)                     router.token_weight   W_tok
  gate.mlp_struct.weight     (G, H)                     router.expert_weight  W_exp
  gate.X                     (E, H)                     router.expert_features
  gate.convs.{l}.lin.weight  (G, G)                     router.gcn_weight[l]
  gate.proj.weight           (1, G)                     router.score_weight   (G,)
  gate.lamb / gate.theta     () / (1,)                  router.poisson_rate / router.normal_std
  experts.{e}.w1_proj.lora_A/B.weight (R,H)/(F,R)       experts.gate_proj.lora_A[e] / lora_B[e]
  self_attn.{q,k,v,o}_proj.lora_A/B.weight              <attn>.lora_A.weight / lora_B.weight
  (graph rebuilt as the published code does at load)    router.expert_adjacency

  mixlora         mixlora.layers.{i}.
  mlp.moe_gate.weight        (E, H)                     router.weight
  mlp.{proj}.experts.{e}.lora_A/B.weight                experts.{proj}.lora_A[e] / lora_B[e]
  self_attn.{proj}.lora_A/B.weight                      <attn>.lora_A.weight / lora_B.weight

Settings this package cannot express (DoRA, MixLoRA's jitter noise, an activation other than
the MLP's, expert LoRA settings that differ from the attention LoRA's) raise a ValueError
that says so, rather than load something that computes differently.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gmoe_kernels.activations import canonical_activation

from .config import EXPERT_MODULES, GMoEConfig
from .model import GMoEModel, _detect_activation, _is_gated_mlp
from .topology import warn_if_twins

__all__ = ["from_gmoe_reference", "from_mixlora", "published_expert_graph"]

CONFIG_NAME = "adapter_config.json"
BIN_NAME = "adapter_model.bin"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLORA_EXPERT_NAMES = {"w1_proj": "gate_proj", "w3_proj": "up_proj", "w2_proj": "down_proj"}
HF_TO_MLORA = {hf: ml for ml, hf in MLORA_EXPERT_NAMES.items()}
PHI_MODULES = ("dense", "fc1", "fc2", "qkv_proj", "gate_up_proj")
_REQUIRED = object()


# ----------------------------------------------------------------------------- reading

def _read_folder(path) -> tuple[Path, dict]:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the adapter folder that holds "
                                f"{CONFIG_NAME} and {BIN_NAME}")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {folder} is not an adapter folder")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")
    return folder, raw


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    bin_path = folder / BIN_NAME
    if not bin_path.is_file():
        hint = ""
        if (folder / "adapter_model.safetensors").is_file():
            hint = (" (there is an adapter_model.safetensors: a folder written by this package's "
                    "save_pretrained loads with GMoEModel.from_pretrained)")
        raise FileNotFoundError(f"{bin_path} not found{hint}")
    try:
        weights = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-tensor objects
        raise ValueError(f"{bin_path} could not be read as a dict of tensors ({type(err).__name__}: "
                         f"{err})") from err
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise ValueError(f"{bin_path} must hold a dict of name -> tensor, got {type(weights).__name__}")
    return weights


def _get(raw: dict, name: str, where: Path, kinds, default=_REQUIRED):
    if name not in raw:
        if default is _REQUIRED:
            raise ValueError(f"{where} has no field {name!r}, which this adapter kind requires")
        return default
    value = raw[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ValueError(f"{where}: field {name!r} must be {names}, got {value!r}")
    return value


def _targets(raw: dict, where: Path, field: str = "target_modules") -> list[str]:
    value = _get(raw, field, where, (list, dict))
    if isinstance(value, dict):
        names = [k for k, on in value.items() if on]
    else:
        names = list(value)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: {field} must name modules by strings, got {value!r}")
    return names


@dataclass
class _Lora:
    r: int
    alpha: float  # effective: alpha / r is the scaling (rsLoRA folded in)
    dropout: float


def _lora_settings(raw: dict, where: Path, label: str) -> _Lora:
    r = _get(raw, "r", where, (int,))
    alpha = _get(raw, "lora_alpha", where, (int, float))
    dropout = _get(raw, "lora_dropout", where, (int, float), 0.0)
    if _get(raw, "use_dora", where, (bool,), False):
        raise ValueError(f"{where}: {label} uses DoRA (use_dora: true), which this package does not "
                         "implement; it cannot be loaded")
    if r < 1 or alpha <= 0:
        raise ValueError(f"{where}: {label} has r={r}, lora_alpha={alpha}; need r >= 1 and lora_alpha > 0")
    if _get(raw, "use_rslora", where, (bool,), False):
        # rsLoRA scales by alpha / sqrt(r); this package by lora_alpha / r.
        alpha = alpha * math.sqrt(r)
    return _Lora(r, float(alpha) if not isinstance(alpha, int) else alpha, float(dropout))


def _expert_lora(raw: dict, where: Path, top: _Lora, has_attention: bool, honoured: bool) -> _Lora:
    """LoRA settings of the experts: `expert_lora` overrides the top level where present."""
    if "expert_lora" not in raw:
        return top
    sub = raw["expert_lora"]
    if not isinstance(sub, dict):
        raise ValueError(f"{where}: expert_lora must be a JSON object, got {sub!r}")
    expert = _lora_settings({**raw, **sub}, where, "expert_lora")
    if (expert.r, expert.alpha) == (top.r, top.alpha):
        return expert
    if honoured and not has_attention:
        return expert
    why = ("the attention LoRA and the experts would need different r / lora_alpha, and this package "
           "has one r and lora_alpha per adapter" if honoured else
           "the mixlora package builds expert LoRAs with the top-level r / lora_alpha while the code "
           "that trained it used expert_lora's, so which outputs to reproduce is ambiguous")
    raise ValueError(f"{where}: expert_lora (r={expert.r}, lora_alpha={expert.alpha}) differs from the "
                     f"top level (r={top.r}, lora_alpha={top.alpha}): {why}")


def _check_activation(raw: dict, where: Path, model: nn.Module, mlp: nn.Module) -> str:
    activation = _detect_activation(model, mlp)
    act_fn = raw.get("act_fn")
    if act_fn is not None:
        try:
            wanted = canonical_activation(act_fn)
        except ValueError as err:
            raise ValueError(f"{where}: act_fn={act_fn!r} is not supported ({err})") from err
        if wanted != activation:
            raise ValueError(f"{where}: act_fn={act_fn!r} differs from the model MLP's activation "
                             f"({activation}); this package's experts and router use the MLP's own "
                             "activation, so the adapter cannot be reproduced on this model")
    return activation


def _make_config(where: Path, **fields) -> GMoEConfig:
    try:
        return GMoEConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{where} cannot be expressed as a GMoE config: {err}") from err


# ----------------------------------------------------------------------------- model layout

@dataclass
class _Layer:
    index: int
    mlp_name: str
    mlp: nn.Module
    attention: dict[str, tuple[str, nn.Linear]]  # proj -> (module name, linear)


def _layers(model: nn.Module, attention_targets: list[str]) -> list[_Layer]:
    """Decoder layers by index i (as in `mixlora.layers.{i}`): their gated MLP and attention linears."""
    if isinstance(model, GMoEModel):
        raise TypeError("pass the plain Hugging Face model: this one already carries GMoE adapters")
    found: dict[int, _Layer] = {}
    for name, module in model.named_modules():
        if not _is_gated_mlp(module):
            continue
        match = re.fullmatch(r"(.*(?:^|\.)layers\.(\d+))\.[^.]+", name)
        if match is None:
            raise ValueError(f"cannot tell the decoder layer index of MLP {name!r}: expected a name like "
                             "'model.layers.<i>.mlp'")
        index = int(match.group(2))
        if index in found:
            raise ValueError(f"decoder layer {index} has two gated MLPs ({found[index].mlp_name}, {name})")
        prefix = match.group(1) + "."
        attention = {}
        for sub_name, sub in model.named_modules():
            proj = sub_name.rpartition(".")[2]
            if sub_name.startswith(prefix) and isinstance(sub, nn.Linear) and proj in attention_targets:
                if proj in attention:
                    raise ValueError(f"decoder layer {index} has two linears named {proj!r} "
                                     f"({attention[proj][0]}, {sub_name})")
                attention[proj] = (sub_name, sub)
        found[index] = _Layer(index, name, module, attention)
    if not found:
        raise ValueError(f"{type(model).__name__} has no decoder MLP with gate_proj, up_proj, down_proj "
                         "and act_fn")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"decoder layer indices {sorted(found)} are not 0..{len(found) - 1}")
    return [found[i] for i in range(len(found))]


# ----------------------------------------------------------------------------- key plan

@dataclass
class _Spec:
    src: str                       # key in adapter_model.bin
    shapes: tuple[tuple[int, ...], ...]  # accepted shapes (the first is the canonical one)
    dst: str | None                # key in GMoEModel.adapter_state_dict()
    index: int | None = None       # slice of dst along dim 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _lora_specs(src_prefix, dst, in_f, out_f, r, index=None, dst_suffix=("", "")) -> list[_Spec]:
    return [_Spec(f"{src_prefix}.lora_A.weight", ((r, in_f),), dst + dst_suffix[0], index),
            _Spec(f"{src_prefix}.lora_B.weight", ((out_f, r),), dst + dst_suffix[1], index)]


def _check_keys(weights: dict, specs: list[_Spec], source: str, model: nn.Module, num_layers: int):
    """Every key the plan calls for is there, nothing else is, and every shape matches."""
    expected = {s.src: s for s in specs}
    missing = [s for s in specs if s.src not in weights]
    if missing:
        listed = ", ".join(f"{s.src} {tuple(s.shapes[0])}" for s in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise ValueError(f"{source} is missing key {listed}{more} that its adapter_config.json and "
                         f"{type(model).__name__} ({num_layers} layers) call for")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        if "classifier" in unexpected:
            raise ValueError(f"{source} holds a sequence-classification head ('classifier', shape "
                             f"{tuple(weights['classifier'].shape)}): it was trained for a classification "
                             "task; this package loads causal-LM adapters only")
        listed = ", ".join(f"{k} {tuple(weights[k].shape)}" for k in unexpected[:4])
        more = f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""
        raise ValueError(f"{source} has unexpected key {listed}{more}: not called for by its "
                         f"adapter_config.json on {type(model).__name__} ({num_layers} layers); "
                         "was it trained on another base model or with other target_modules?")
    for spec in specs:
        tensor = weights[spec.src]
        if tuple(tensor.shape) not in spec.shapes:
            raise ValueError(f"{source}: {spec.src} has shape {tuple(tensor.shape)} but "
                             f"{type(model).__name__} with this adapter_config.json expects "
                             f"{tuple(spec.shapes[0])}; the adapter was made for another base model or config")
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: {spec.src} has dtype {tensor.dtype}; a floating-point tensor is expected")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: {spec.src} holds NaN or infinite values")


def _build(model: nn.Module, config: GMoEConfig, weights: dict, specs: list[_Spec],
           extra: dict[str, torch.Tensor], source: str, backend: str | None) -> GMoEModel:
    """Inject GMoE into `model`, copy the checked tensors in; on failure give the model back untouched."""
    if backend is not None:
        config.backend = backend
    flags = [(p, p.requires_grad) for p in model.parameters()]
    wrapped = GMoEModel(model, config, _build_graph=False)
    try:
        state = {k: v.clone() for k, v in wrapped.adapter_state_dict().items()}
        for spec in specs:
            if spec.dst is None:
                continue
            value = weights[spec.src]
            if spec.transform is not None:
                value = spec.transform(value)
            target = state[spec.dst] if spec.index is None else state[spec.dst][spec.index]
            if tuple(target.shape) != tuple(value.shape):  # a bug in the plan, not in the adapter
                raise RuntimeError(f"internal: {spec.src} {tuple(value.shape)} -> {spec.dst} {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
        for key, value in extra.items():
            state[key].copy_(value.to(state[key].dtype))
        wrapped.load_adapter_state_dict(state, source=source)
    except BaseException:
        wrapped.unload()
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return wrapped


# ----------------------------------------------------------------------------- published GMoE

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


def from_gmoe_reference(hf_model: nn.Module, path: str | os.PathLike, backend: str | None = None) -> GMoEModel:
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
    folder, raw = _read_folder(path)
    where = folder / CONFIG_NAME
    peft_type = raw.get("peft_type")
    strategy = raw.get("routing_strategy")
    if peft_type == "GMOE":
        raise ValueError(f"{where} is this package's own format (peft_type 'GMOE'): load it with "
                         "GMoEModel.from_pretrained")
    if strategy != "goe" or peft_type not in (None, "MIXLORA"):
        hint = " (a mixlora-package adapter: use gmoe.convert.from_mixlora)" if strategy == "mixlora" else ""
        raise ValueError(f"{where} has peft_type={peft_type!r}, routing_strategy={strategy!r}: not an adapter "
                         f"of the published GMoE code, which writes routing_strategy 'goe'{hint}")

    # ---- config
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

    names = _targets(raw, where)
    phi = [n for n in names if n in PHI_MODULES]
    if phi:
        raise ValueError(f"{where}: target_modules {phi} are Phi module names; only models with "
                         "gate_proj/up_proj/down_proj MLPs are supported")
    ignored = [n for n in names if n not in ATTENTION_MODULES and n not in MLORA_EXPERT_NAMES]
    if ignored:
        warnings.warn(f"{where}: target_modules {ignored} are not mLoRA names (q_proj, k_proj, v_proj, "
                      "o_proj, w1_proj, w2_proj, w3_proj); the published code ignores them, and so does "
                      "this loader", stacklevel=2)
    attention = [n for n in ATTENTION_MODULES if n in names]
    experts = [MLORA_EXPERT_NAMES[n] for n in ("w1_proj", "w3_proj", "w2_proj") if n in names]
    experts = [m for m in EXPERT_MODULES if m in experts]
    if not experts:
        raise ValueError(f"{where}: target_modules {names} name none of w1_proj, w2_proj, w3_proj, so "
                         "every expert is the plain MLP; such an adapter has no GMoE layer to load")
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

    # ---- keys
    weights = _read_weights(folder)
    source = str(folder / BIN_NAME)
    specs: list[_Spec] = []
    for layer in layers:
        i, mlp, pre = layer.index, layer.mlp, f"mixlora.layers.{layer.index}."
        hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        G, router = gcn_dim, f"{layer.mlp_name}.router."
        specs += [
            _Spec(pre + "gate.X", ((E, hidden),), router + "expert_features"),
            _Spec(pre + "gate.mlp.weight", ((G, hidden),), router + "token_weight"),
            _Spec(pre + "gate.mlp_struct.weight", ((G, hidden),), router + "expert_weight"),
            _Spec(pre + "gate.proj.weight", ((1, G),), router + "score_weight", None, lambda t: t.reshape(-1)),
            _Spec(pre + "gate.lamb", ((), (1,)), router + "poisson_rate", None, lambda t: t.reshape(())),
            _Spec(pre + "gate.theta", ((1,), ()), router + "normal_std", None, lambda t: t.reshape(())),
        ]
        specs += [_Spec(pre + f"gate.convs.{l}.lin.weight", ((G, G),), router + "gcn_weight", l)
                  for l in range(gcn_layers)]
        shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
        for proj in experts:
            for e in range(E):
                specs += _lora_specs(pre + f"experts.{e}.{HF_TO_MLORA[proj]}",
                                     f"{layer.mlp_name}.experts.{proj}.", *shapes[proj], lora.r, e,
                                     ("lora_A", "lora_B"))
        for proj in attention:
            name, linear = layer.attention[proj]
            specs += _lora_specs(pre + f"self_attn.{proj}", name, linear.in_features,
                                 linear.out_features, top.r, None, (".lora_A.weight", ".lora_B.weight"))
    _check_keys(weights, specs, source, hf_model, len(layers))
    for spec in specs:
        if spec.src.endswith(("gate.lamb", "gate.theta")) and not weights[spec.src].item() > 0:
            raise ValueError(f"{source}: {spec.src} = {weights[spec.src].item()} must be positive")

    # ---- the graph, as the published code rebuilds it at load
    extra = {}
    for layer, threshold in zip(layers, per_layer):
        pre = f"mixlora.layers.{layer.index}.gate."
        adjacency = published_expert_graph(weights[pre + "X"], weights[pre + "mlp_struct.weight"],
                                           layer.mlp.act_fn, threshold)
        extra[f"{layer.mlp_name}.router.expert_adjacency"] = adjacency
        warn_if_twins(adjacency, f"published GMoE adapter {folder}, layer {layer.index}")
    return _build(hf_model, config, weights, specs, extra, source, backend)


# ----------------------------------------------------------------------------- mixlora

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
    folder, raw = _read_folder(path)
    where = folder / CONFIG_NAME
    peft_type = raw.get("peft_type")
    strategy = raw.get("routing_strategy")
    if peft_type == "GMOE":
        raise ValueError(f"{where} is this package's own format (peft_type 'GMOE'): load it with "
                         "GMoEModel.from_pretrained")
    if peft_type != "MIXLORA" or strategy != "mixlora":
        hint = ""
        if strategy == "goe":
            hint = " (an adapter of the published GMoE code: use gmoe.convert.from_gmoe_reference)"
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

    names = _targets(raw, where)
    phi = [n for n in names if n in PHI_MODULES]
    if phi:
        raise ValueError(f"{where}: target_modules {phi} are Phi/Phi-3 module names; only models with "
                         "gate_proj/up_proj/down_proj MLPs are supported")
    ignored = [n for n in names if n not in ATTENTION_MODULES and n not in EXPERT_MODULES]
    if ignored:
        warnings.warn(f"{where}: target_modules {ignored} are not names mixlora knows (q_proj, k_proj, "
                      "v_proj, o_proj, gate_proj, up_proj, down_proj); mixlora ignores them, and so does "
                      "this loader", stacklevel=2)
    attention = [n for n in ATTENTION_MODULES if n in names]
    experts = [n for n in EXPERT_MODULES if n in names]
    if not experts:
        raise ValueError(f"{where}: target_modules {names} name none of gate_proj, up_proj, down_proj, so "
                         "every expert is the plain MLP; such an adapter has no MoE layer to load")
    top = _lora_settings(raw, where, "the adapter")
    lora = _expert_lora(raw, where, top, bool(attention), honoured=False)

    layers = _layers(hf_model, attention)
    _check_activation(raw, where, hf_model, layers[0].mlp)
    config = _make_config(
        where, num_experts=num_experts, top_k=top_k, r=lora.r, lora_alpha=lora.alpha,
        lora_dropout=lora.dropout, router="linear", poisson_loss_coef=0.0, normal_loss_coef=0.0,
        aux_loss_coef=float(aux) if router_loss else 0.0, target_modules=attention, expert_modules=experts,
        base_model_name_or_path=raw.get("base_model_name_or_path") or None)

    weights = _read_weights(folder)
    source = str(folder / BIN_NAME)
    specs: list[_Spec] = []
    for layer in layers:
        mlp, pre = layer.mlp, f"mixlora.layers.{layer.index}."
        hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        specs.append(_Spec(pre + "mlp.moe_gate.weight", ((num_experts, hidden),),
                           f"{layer.mlp_name}.router.weight"))
        shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
        for proj in experts:
            for e in range(num_experts):
                specs += _lora_specs(pre + f"mlp.{proj}.experts.{e}", f"{layer.mlp_name}.experts.{proj}.",
                                     *shapes[proj], lora.r, e, ("lora_A", "lora_B"))
        for proj in attention:
            name, linear = layer.attention[proj]
            specs += _lora_specs(pre + f"self_attn.{proj}", name, linear.in_features,
                                 linear.out_features, top.r, None, (".lora_A.weight", ".lora_B.weight"))
    _check_keys(weights, specs, source, hf_model, len(layers))
    return _build(hf_model, config, weights, specs, {}, source, backend)
