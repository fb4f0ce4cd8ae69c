"""Method name -> adapter on a base model; everything else (data, steps, schedule, seed) is the
caller's and identical across methods.

- gmoe: graph router, Poisson distinction + Normal balance losses (default coefficients)
- gmoe-no-graph: linear router, keeping both GMoE losses
- gmoe-no-poisson / gmoe-no-normal: graph router without that loss
- gmoe-window: gmoe with a decaying running load (load_decay 0.9: about the last 10 steps count)
- gmoe-frozen: gmoe with λ and σ frozen at their inits (as the published code, where they never train)
- gmoe-uniform: gmoe with one weight on every token–expert edge (token_coupling "uniform")
- gmoe-balanced: gmoe-window and gmoe-uniform together: the two options that spread the routing in the
  study's routing runs (docs/routing.md); freezing λ and σ changed nothing there and is left out
- gmoe-token: gmoe whose router reads the expert states with each token's own vector W_q x (token_readout),
  token projection gain 3 and load_decay 0.9: the settings under which the token decides (docs/routing.md)
- mixlora: linear router with the Switch load-balancing loss (MixLoRA's default coefficient 0.01)
- lora: PEFT LoraConfig on the same seven projections with the same rank
- lora-matched: lora whose rank gives it as many trainable parameters as `gmoe` at the same spec (experts,
  router, λ and σ included) on this base model, the nearest rank: a LoRA as large as the mixture
All put a LoRA of rank r on q/k/v/o_proj; the MoE methods put E LoRA experts of rank r on gate/up/down_proj.
"""
from __future__ import annotations

from dataclasses import dataclass

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]

GMOE_LOSSES = {"poisson_loss_coef": 0.005, "normal_loss_coef": 8.0, "aux_loss_coef": 0.0}
METHOD_OVERRIDES = {
    "gmoe": {"router": "graph"},
    "gmoe-no-graph": {"router": "linear"},
    "gmoe-no-poisson": {"router": "graph", "poisson_loss_coef": 0.0},
    "gmoe-no-normal": {"router": "graph", "normal_loss_coef": 0.0},
    "gmoe-window": {"router": "graph", "load_decay": 0.9},
    "gmoe-frozen": {"router": "graph", "freeze_loss_params": True},
    "gmoe-uniform": {"router": "graph", "token_coupling": "uniform"},
    "gmoe-balanced": {"router": "graph", "load_decay": 0.9, "token_coupling": "uniform"},
    "gmoe-token": {"router": "graph", "token_readout": True, "token_init_gain": 3.0, "load_decay": 0.9},
    "mixlora": {"router": "linear", "poisson_loss_coef": 0.0, "normal_loss_coef": 0.0, "aux_loss_coef": 0.01},
}
METHODS = [*METHOD_OVERRIDES, "lora", "lora-matched"]
PEFT_METHODS = ("lora", "lora-matched")


@dataclass
class AdapterSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    experts: int = 8
    top_k: int = 2


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return name


def gmoe_config(method: str, spec: AdapterSpec):
    import gmoe

    fields = {**GMOE_LOSSES, **METHOD_OVERRIDES[check_method(method)]}
    return gmoe.GMoEConfig(num_experts=spec.experts, top_k=spec.top_k, r=spec.r, lora_alpha=spec.alpha,
                           lora_dropout=spec.dropout, target_modules=list(ATTENTION_MODULES),
                           expert_modules=list(MLP_MODULES), **fields)


def lora_config(spec: AdapterSpec, r: int | None = None):
    """PEFT LoRA on the seven projections; rank `r` (default spec.r) with the spec's scaling alpha / r."""
    import peft

    r = spec.r if r is None else r
    return peft.LoraConfig(r=r, lora_alpha=spec.alpha * r / spec.r, lora_dropout=spec.dropout,
                           target_modules=ATTENTION_MODULES + MLP_MODULES, bias="none", task_type="CAUSAL_LM")


def apply_method(model, method: str, spec: AdapterSpec):
    """The base model with the method's adapter injected (base frozen)."""
    if check_method(method) in PEFT_METHODS:
        import peft

        r = matched_rank(model, spec) if method == "lora-matched" else spec.r
        return peft.get_peft_model(model, lora_config(spec, r))
    import gmoe

    return gmoe.get_gmoe_model(model, gmoe_config(method, spec))


def matched_rank(model, spec: AdapterSpec) -> int:
    """The LoRA rank whose trainable-parameter count on the seven projections of `model` is nearest the
    `gmoe` method's at `spec`. GMoE is injected and removed again to count it (unload() returns the
    untouched base), so the count is exact whatever the model's shapes."""
    import gmoe

    injected = gmoe.get_gmoe_model(model, gmoe_config("gmoe", spec))
    target = sum(p.numel() for p in injected.parameters() if p.requires_grad)
    base = injected.unload()
    names = set(ATTENTION_MODULES + MLP_MODULES)
    per_rank = sum(m.in_features + m.out_features for n, m in base.named_modules()
                   if n.rsplit(".", 1)[-1] in names and hasattr(m, "in_features"))
    if per_rank == 0:
        raise ValueError("lora-matched: the model has none of the projections " + ", ".join(sorted(names)))
    return max(1, round(target / per_rank))


def read_adapter_config(path: str) -> dict:
    """The adapter folder's adapter_config.json as a dict, or an error naming the file and the problem."""
    import json
    import os

    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"--adapter {path} has no adapter_config.json: pass a folder written by a "
                                "training run (<run dir>/adapter)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{cfg_path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                         "the adapter folder is corrupt") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON ({err}); the adapter folder is corrupt") from err
    if not isinstance(data, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(data).__name__}; "
                         "the adapter folder is corrupt")
    return data


def load_adapter(model, path: str, trainable: bool = False):
    """A saved adapter (GMoE or PEFT LoRA folder) onto the base model; a config whose peft_type is
    neither is a ValueError naming the file."""
    from .adapters import adapter_kind

    if adapter_kind(path) == "GMOE":
        import gmoe

        return gmoe.GMoEModel.from_pretrained(model, path, is_trainable=trainable)
    import peft

    try:
        return peft.PeftModel.from_pretrained(model, path, is_trainable=trainable)
    except RuntimeError as err:  # torch's size-mismatch report of load_state_dict
        if "size mismatch" not in str(err):
            raise
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line
                       and "copying a param" in line), str(err).splitlines()[0])
        raise ValueError(f"--adapter {path} does not fit this base model (it was trained on a base of "
                         f"another size): {detail}") from err


def trainable_parameters(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}
