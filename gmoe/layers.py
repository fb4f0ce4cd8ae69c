"""Injected modules: a plain LoRA linear and the GMoE mixture-of-LoRA-experts MLP.

Both hold references to the frozen base modules (never copies) and give them back on unload.
Adapter parameters are kept in fp32 (as PEFT does) and cast to the activations' dtype per call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from gmoe_kernels import functional

from .config import EXPERT_MODULES, GMoEConfig
from .router import GraphRouter, LinearRouter


class LoRALinear(nn.Module):
    """y = base(x) + s · B A dropout(x), with lora_A (R, in) Kaiming-uniform and lora_B (out, R) zero."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = lora_alpha / r
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=base_layer.weight.device)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=base_layer.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)))
        return self.base_layer(x) + (self.scaling * lora).to(x.dtype)


class ExpertLoRA(nn.Module):
    """Stacked LoRA weights of E experts on one MLP projection: lora_A (E,R,in), lora_B (E,out,R).

    A projection not in `expert_modules` keeps zero, frozen, unsaved weights (buffers), so
    the fused op sees the same layout either way.
    """

    def __init__(self, num_experts, r, in_features, out_features, trainable=True, device=None):
        super().__init__()
        a = torch.empty(num_experts, r, in_features, device=device)
        for e in range(num_experts):
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
        b = torch.zeros(num_experts, out_features, r, device=device)
        if trainable:
            self.lora_A, self.lora_B = nn.Parameter(a), nn.Parameter(b)
        else:
            self.register_buffer("lora_A", torch.zeros_like(a), persistent=False)
            self.register_buffer("lora_B", b, persistent=False)


class GMoEMLP(nn.Module):
    """A decoder MLP turned into a graph-routed mixture of LoRA experts.

    Holds the base MLP (gate_proj, up_proj, down_proj, act_fn) as `base_layer`. Each forward
    records the router's output of the last call (`last_routing`) so that GMoEModel can
    compute the router losses after the whole model has run.
    """

    def __init__(self, base_layer: nn.Module, config: GMoEConfig, activation: str, build_graph=True):
        super().__init__()
        self.base_layer = base_layer
        self.activation = activation
        self.config = config
        self.scaling = config.scaling
        gate = base_layer.gate_proj
        hidden, inter = gate.in_features, gate.out_features
        device = gate.weight.device
        E, r = config.num_experts, config.r
        shapes = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
        self.experts = nn.ModuleDict({
            name: ExpertLoRA(E, r, *shapes[name], trainable=name in config.expert_modules, device=device)
            for name in EXPERT_MODULES})
        if config.router == "graph":
            self.router = GraphRouter(hidden, E, config.top_k, config.gcn_dim, config.gcn_layers,
                                      config.edge_density, activation, config.token_init_gain,
                                      build_graph=build_graph).to(device)
        else:
            self.router = LinearRouter(hidden, E, config.top_k).to(device)
        self.register_buffer("expert_load", torch.zeros(E, device=device))
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.last_routing = None

    def _apply(self, fn, recurse=True):
        # A running count must stay fp32: in bf16 it stops growing after a few hundred steps.
        super()._apply(fn, recurse)
        if self.expert_load.dtype != torch.float32:
            self.expert_load = self.expert_load.float()
        return self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        shape = hidden_states.shape
        if shape[-1] != base.gate_proj.in_features:
            raise ValueError(f"GMoEMLP expects hidden size {base.gate_proj.in_features}, got input of shape {tuple(shape)}")
        if hidden_states.device != base.gate_proj.weight.device:
            raise ValueError(f"input is on {hidden_states.device} but the MLP weights are on "
                             f"{base.gate_proj.weight.device}; move the model or the input")
        x = hidden_states.reshape(-1, shape[-1])
        backend = self.config.backend
        # The router runs in fp32 on fp32 weights (the gain-100 token projection loses
        # top-k decisions when rounded to bf16); it is a small part of the layer's cost.
        logits, probs, indices, weights = self.router(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x,
                                                      backend=backend)
        # Checkpointing recomputes this forward inside backward: keep the first call's record.
        if torch._C._current_graph_task_id() == -1:
            self.last_routing = (probs, indices, weights)
        dtype = x.dtype
        ex = self.experts
        lora_input = self.lora_dropout(x) if self.training else x
        y = functional.expert_ffn(
            x, base.gate_proj.weight, base.up_proj.weight, base.down_proj.weight,
            ex["gate_proj"].lora_A.to(dtype), ex["gate_proj"].lora_B.to(dtype),
            ex["up_proj"].lora_A.to(dtype), ex["up_proj"].lora_B.to(dtype),
            ex["down_proj"].lora_A.to(dtype), ex["down_proj"].lora_B.to(dtype),
            indices, weights, self.scaling, self.activation,
            gate_bias=base.gate_proj.bias, up_bias=base.up_proj.bias, down_bias=base.down_proj.bias,
            lora_input=lora_input, backend=backend)
        return y.view(shape)
