"""Injected modules: a plain LoRA linear and the GMoE mixture-of-LoRA-experts MLP.

Both hold references to the frozen base modules (never copies) and give them back on unload.
They call the base modules (never their raw weights), so quantized bases (bitsandbytes) and
Accelerate's hooks on them work. Dtype policy (DESIGN.md, "Dtypes"): adapters are created in
fp32 by default (`adapter_dtype="base"`: the base weights' dtype) and cast to the activations'
dtype per call; the router, λ, σ and the running load stay fp32 under any `.to(dtype)`.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from gmoe_kernels import functional
from gmoe_kernels.activations import act

from . import losses, telemetry
from .config import EXPERT_MODULES, GMoEConfig
from .router import GraphRouter, LinearRouter
from .padding import TokenRows
from .router_cache import TermCache

HALF_DTYPES = (torch.float16, torch.bfloat16)


def adapter_dtype(base_layer: nn.Module, config: GMoEConfig) -> torch.dtype:
    """The dtype new adapter weights get: fp32, or the base weights' if floating (not quantized)."""
    weight_dtype = base_layer.weight.dtype
    if config.adapter_dtype == "base" and weight_dtype.is_floating_point:
        return weight_dtype
    return torch.float32


def _autocast_off(device: torch.device):
    """A region where autocast does not recast: the router and the fused mix choose their dtypes."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _padded_routing(probs, indices, weights, rows, num_tokens):
    """The routing of the real `rows` scattered into all `num_tokens` rows; a padding row gets
    a valid placeholder (uniform probabilities, experts 0..K-1, equal weights) so that every
    statistic of it is finite before the mask leaves it out."""
    num_experts, top_k = probs.shape[1], indices.shape[1]
    filled = (probs.new_full((num_tokens, num_experts), 1.0 / num_experts),
              torch.arange(top_k, device=indices.device).expand(num_tokens, top_k).clone(),
              weights.new_full((num_tokens, top_k), 1.0 / top_k))
    return tuple(full.index_copy_(0, rows, part) for full, part in zip(filled, (probs, indices, weights)))


class LoRALinear(nn.Module):
    """y = base(x) + s · B A dropout(x), with lora_A (R, in) Kaiming-uniform and lora_B (out, R) zero."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = lora_alpha / r
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.disabled = False  # set by GMoEModel.disable_adapter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        lora = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)))
        return out + (self.scaling * lora).to(out.dtype)

    def merged_base(self) -> nn.Linear:
        """The base linear with s · B A added to its weight (in place), for merge_attention()."""
        weight = self.base_layer.weight
        if not weight.dtype.is_floating_point:
            raise ValueError(f"cannot merge a LoRA into a {type(self.base_layer).__name__} with {weight.dtype} "
                             "weights (quantized?): keep the adapter unmerged, or merge into a dequantized copy")
        with torch.no_grad():
            delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
            weight.add_(delta.to(weight.dtype))
        return self.base_layer


class ExpertLoRA(nn.Module):
    """Stacked LoRA weights of E experts on one MLP projection: lora_A (E,R,in), lora_B (E,out,R).

    A projection not in `expert_modules` keeps zero, frozen, unsaved weights (buffers), so
    the fused op sees the same layout either way.
    """

    def __init__(self, num_experts, r, in_features, out_features, trainable=True, device=None,
                 dtype=torch.float32):
        super().__init__()
        a = torch.empty(num_experts, r, in_features, device=device)
        for e in range(num_experts):
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
        a = a.to(dtype)
        b = torch.zeros(num_experts, out_features, r, device=device, dtype=dtype)
        if trainable:
            self.lora_A, self.lora_B = nn.Parameter(a), nn.Parameter(b)
        else:
            self.register_buffer("lora_A", torch.zeros_like(a), persistent=False)
            self.register_buffer("lora_B", b, persistent=False)


class GMoEMLP(nn.Module):
    """A decoder MLP turned into a graph-routed mixture of LoRA experts.

    Holds the base MLP (gate_proj, up_proj, down_proj, act_fn) as `base_layer`. Each forward
    records the router's output of the last call (`last_routing`) and the loss targets
    (`last_loss_targets`) so that GMoEModel can compute the router losses after the whole
    model has run.
    """

    def __init__(self, base_layer: nn.Module, config: GMoEConfig, activation: str, build_graph=True):
        super().__init__()
        self.base_layer = base_layer
        self.activation = activation
        self.config = config
        self.scaling = config.scaling
        gate = base_layer.gate_proj
        hidden, inter = gate.in_features, gate.out_features
        device, dtype = gate.weight.device, adapter_dtype(gate, config)
        E, r = config.num_experts, config.r
        shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
        self.experts = nn.ModuleDict({
            name: ExpertLoRA(E, r, *shapes[name], trainable=name in config.expert_modules, device=device,
                             dtype=dtype)
            for name in EXPERT_MODULES})
        coefs = dict(poisson_loss_coef=config.poisson_loss_coef, normal_loss_coef=config.normal_loss_coef,
                     freeze_loss_params=config.freeze_loss_params)
        if config.router == "graph":
            self.router = GraphRouter(hidden, E, config.top_k, config.gcn_dim, config.gcn_layers,
                                      config.edge_density, activation, config.token_init_gain,
                                      build_graph=build_graph, token_coupling=config.token_coupling,
                                      token_readout=config.token_readout,
                                      **coefs).to(device)
        else:
            self.router = LinearRouter(hidden, E, config.top_k, **coefs).to(device)
        self.register_buffer("expert_load", torch.zeros(E, device=device))
        telemetry.register_window(self, E, config.top_k, device)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.last_routing = self.last_loss_targets = None
        self.disabled = False  # set by GMoEModel.disable_adapter()
        self.target_cache = TermCache()  # the router-loss targets in eval (record_routing)
        #: Set by GMoEModel: which rows of the current forward are real tokens (`TokenRows`).
        self.token_rows: TokenRows | None = None

    def train(self, mode: bool = True):
        self.target_cache.clear()  # as GraphRouter.train: also covers compiled training steps
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # The router (gain-100 token projection, λ, σ) loses top-k decisions in half precision,
        # and a half-precision running count stops growing after a few hundred steps: they stay
        # fp32 whatever `.to(dtype)` / `.half()` / `.bfloat16()` asked for (fp64 is kept).
        super()._apply(fn, recurse)
        counts = ("expert_load", *telemetry.COUNT_NAMES, "routing_tokens")  # counts saturate in half precision
        for tensor in (*self.router.parameters(), *self.router.buffers(), *(getattr(self, n) for n in counts)):
            if tensor.dtype in HALF_DTYPES:
                self.router.float()
                for name in counts:
                    setattr(self, name, getattr(self, name).float())
                break
        return self

    def record_routing(self, probs, indices, weights) -> None:
        """Keep what GMoEModel.router_loss needs of this forward: the routing, and the Poisson and
        Normal log targets computed from λ and σ now, while this layer's parameters are gathered
        (FSDP2 and ZeRO-3 reshard them after the layer's forward).

        Activation checkpointing recomputes the forward inside backward: the targets are computed
        then too (the recomputation must save the same tensors), but only the first call is kept.
        """
        cfg, router = self.config, self.router

        def build():
            return (
                losses.poisson_log_target(cfg.num_experts, router.poisson_rate) if cfg.poisson_loss_coef > 0 else None,
                losses.normal_log_target(cfg.num_experts, router.normal_std) if cfg.normal_loss_coef > 0 else None)

        # In eval the targets, like the router's token-independent terms, are computed once and
        # reused while λ and σ are unchanged (gmoe.router_cache): ~20 small ops per layer and forward.
        sources = [t for t in (getattr(router, "poisson_rate", None), getattr(router, "normal_std", None))
                   if t is not None]
        if sources and self.target_cache.usable(self, sources):
            targets = self.target_cache.get(sources, (), build)
        else:
            # a forward that can lead to an optimizer step drops the entry: fused optimizers do not
            # bump version counters (see GraphRouter.token_independent_terms)
            self.target_cache.clear()
            targets = build()
        # (Dynamo cannot trace the graph-task query; a compiled forward is never a recompute.)
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
            self.last_routing, self.last_loss_targets = (probs, indices, weights), targets

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.disabled:
            return base(hidden_states)
        shape = hidden_states.shape
        if shape[-1] != base.gate_proj.in_features:
            raise ValueError(f"GMoEMLP expects hidden size {base.gate_proj.in_features}, got input of shape {tuple(shape)}")
        if hidden_states.device != base.gate_proj.weight.device:
            raise ValueError(f"input is on {hidden_states.device} but the MLP weights are on "
                             f"{base.gate_proj.weight.device}; move the model or the input")
        x = hidden_states.reshape(-1, shape[-1])
        rows = self.token_rows.real(x.shape[0]) if self.token_rows is not None and not self.training else None
        y, routing = self._mix(x, rows)
        self.record_routing(*routing)
        return y.view(*shape[:-1], y.shape[-1])

    def _mix(self, x: torch.Tensor, rows: torch.Tensor | None = None):
        """(y (T, H), (probs, indices, weights)) for the flattened tokens x (T, H).

        rows: the real tokens of an eval forward with padding (`gmoe.padding`), or None. Then
        only those rows are routed and reach the experts; a padding row gets the base MLP's
        output (the frozen projections run on every row, as without padding) and a zero
        routing, which the router loss and the telemetry leave out by the same mask.
        """
        base = self.base_layer
        backend = self.config.backend
        routed = x if rows is None else x.index_select(0, rows)
        with _autocast_off(x.device):
            # The router runs in fp32 on fp32 weights (the gain-100 token projection loses
            # top-k decisions when rounded to bf16); it is a small part of the layer's cost.
            router_input = routed.float() if routed.dtype in HALF_DTYPES else routed
            logits, probs, indices, weights = self.router(router_input, backend=backend)
        # The frozen projections run as modules (quantized or hooked bases work, and under
        # autocast they choose the compute dtype); everything in between is the fused mix.
        gate_base, up_base = base.gate_proj(x), base.up_proj(x)
        dtype = gate_base.dtype
        ex = self.experts
        lora_input = self.lora_dropout(routed) if self.training else routed
        gate_routed, up_routed = (gate_base, up_base) if rows is None else \
            (gate_base.index_select(0, rows), up_base.index_select(0, rows))
        with _autocast_off(x.device):
            h_c, z = functional.expert_mix(
                lora_input.to(dtype), gate_routed, up_routed.to(dtype),
                ex["gate_proj"].lora_A.to(dtype), ex["gate_proj"].lora_B.to(dtype),
                ex["up_proj"].lora_A.to(dtype), ex["up_proj"].lora_B.to(dtype),
                ex["down_proj"].lora_A.to(dtype), indices, weights, self.scaling, self.activation,
                backend=backend)
            if rows is not None:
                h_c = (act(self.activation, gate_base) * up_base.to(dtype)).index_copy_(0, rows, h_c)
                z = z.new_zeros(x.shape[0], z.shape[1]).index_copy_(0, rows, z)
                probs, indices, weights = _padded_routing(probs, indices, weights, rows, x.shape[0])
            down_lora = functional.stacked_down_lora(z, ex["down_proj"].lora_B.to(dtype), self.scaling)
        y = base.down_proj(h_c)
        return y + down_lora.to(y.dtype), (probs, indices, weights)
