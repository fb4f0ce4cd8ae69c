"""What both adapter loaders share: reading an adapter folder (adapter_config.json and
adapter_model.bin), typed config fields, target_modules and LoRA settings, the decoder layers of
the base model, the key plan with its key/shape checks, and the copy into a GMoEModel.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from gmoe_kernels.activations import canonical_activation

from ..config import EXPERT_MODULES, GMoEConfig
from ..activation import detect_activation
from ..model import GMoEModel, is_gated_mlp

CONFIG_NAME = "adapter_config.json"
BIN_NAME = "adapter_model.bin"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
PHI_MODULES = ("dense", "fc1", "fc2", "qkv_proj", "gate_up_proj")
_REQUIRED = object()


# ----------------------------------------------------------------------------- reading

def _read_config(path) -> tuple[Path, dict, Path]:
    """The adapter folder, its adapter_config.json as a dict, and that file's path (for messages).

    This package's own format (peft_type 'GMOE') is refused: GMoEModel.from_pretrained loads it.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the adapter folder that holds "
                                f"{CONFIG_NAME} and {BIN_NAME}")
    where = folder / CONFIG_NAME
    if not where.is_file():
        raise FileNotFoundError(f"{where} not found: {folder} is not an adapter folder")
    try:
        raw = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") == "GMOE":
        raise ValueError(f"{where} is this package's own format (peft_type 'GMOE'): load it with "
                         "GMoEModel.from_pretrained")
    return folder, raw, where


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of adapter_model.bin (`torch.load(weights_only=True)`) and its path (for messages)."""
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
    return weights, str(bin_path)


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


def _split_targets(raw: dict, where: Path, expert_names: dict[str, str],
                   tool: str) -> tuple[list[str], list[str]]:
    """target_modules -> (attention projections, expert projections as EXPERT_MODULES names).

    `expert_names` maps the adapter's names of the expert projections to this package's (in the
    order messages list them); `tool` names the code that wrote the adapter, for messages.
    Phi module names raise; names neither list knows warn (`tool` ignores them, so does this
    loader); no expert projection at all raises (there would be no MoE layer).
    """
    names = _targets(raw, where)
    phi = [n for n in names if n in PHI_MODULES]
    if phi:
        raise ValueError(f"{where}: target_modules {phi} are Phi/Phi-3 module names; only models with "
                         "gate_proj/up_proj/down_proj MLPs are supported")
    known = (*ATTENTION_MODULES, *expert_names)
    ignored = [n for n in names if n not in known]
    if ignored:
        # stacklevel 3: the caller of from_published_gmoe / from_mixlora
        warnings.warn(f"{where}: target_modules {ignored} are not names {tool} knows ({', '.join(known)}); "
                      f"{tool} ignores them, and so does this loader", stacklevel=3)
    attention = [n for n in ATTENTION_MODULES if n in names]
    chosen = {expert_names[n] for n in names if n in expert_names}
    experts = [m for m in EXPERT_MODULES if m in chosen]
    if not experts:
        raise ValueError(f"{where}: target_modules {names} name none of {', '.join(expert_names)}, so "
                         "every expert is the plain MLP; such an adapter has no MoE layer to load")
    return attention, experts


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
    activation = detect_activation(model, mlp)
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
        if not is_gated_mlp(module):
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


def _expert_specs(layer: _Layer, experts: list[str], num_experts: int, r: int,
                  src_prefix: Callable[[str, int], str]) -> list[_Spec]:
    """LoRA A/B of every expert e on every projection in `experts`; `src_prefix(proj, e)` is the
    adapter's key prefix, the destination is slice e of `<mlp>.experts.<proj>.lora_A/B`."""
    hidden, inter = layer.mlp.gate_proj.in_features, layer.mlp.gate_proj.out_features
    shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    specs = []
    for proj in experts:
        for e in range(num_experts):
            specs += _lora_specs(src_prefix(proj, e), f"{layer.mlp_name}.experts.{proj}.", *shapes[proj],
                                 r, e, ("lora_A", "lora_B"))
    return specs


def _attention_specs(layer: _Layer, attention: list[str], r: int) -> list[_Spec]:
    """LoRA A/B of the attention projections: `mixlora.layers.{i}.self_attn.{proj}` -> `<attn>.lora_A/B`."""
    specs = []
    for proj in attention:
        name, linear = layer.attention[proj]
        specs += _lora_specs(f"mixlora.layers.{layer.index}.self_attn.{proj}", name, linear.in_features,
                             linear.out_features, r, None, (".lora_A.weight", ".lora_B.weight"))
    return specs


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


# ----------------------------------------------------------------------------- the copy

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
