"""The public ops: one signature each, whichever backend runs them.

Shapes use DESIGN.md's letters: T tokens, H hidden, F intermediate, E experts, K top-k,
R LoRA rank, G router width, L router layers. `backend` is "auto" | "reference" | "triton"
(see gmoe_kernels.backend; the env var GMOE_BACKEND overrides it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference, small_batch
from .backend import resolve_backend
from .checks import (check_activation, check_expert_mix, check_graph_router, check_layer1_constant,
                     check_routing_indices)
from .reference.expert_mix_gathered import expert_mix_gathered
from .routing_plan import RoutingPlan


def _triton():
    from . import triton as triton_ops  # imported lazily: Triton is optional at import time
    return triton_ops


def expert_mix(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
               lora_a_down, indices, weights, scaling: float, activation: str,
               backend: str | None = None):
    """Everything between the frozen GEMMs of a GMoE FFN, fused.

    x:           (T, H)     input of the LoRA shrinks (after LoRA dropout, if any)
    gate_base:   (T, F)     W_g x (+ bias), the frozen gate projection
    up_base:     (T, F)     W_u x (+ bias)
    lora_a_gate: (E, R, H)  lora_b_gate: (E, F, R)
    lora_a_up:   (E, R, H)  lora_b_up:   (E, F, R)
    lora_a_down: (E, R, F)
    indices:     (T, K) int64 chosen experts;  weights: (T, K) mixing weights
    Returns h_c (T, F) = sum_k w_k h_k and z (T, E·R) with w_k A_d^{e_k} h_k in block e_k.
    A few tokens with no gradient recorded (decoding) take the gathered path, which needs no
    routing plan (`gmoe_kernels.small_batch`); the results agree to rounding.
    """
    tensors = (x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up, lora_a_down, weights)
    if not all(isinstance(t, torch.Tensor) for t in tensors):   # the clear TypeError first
        check_expert_mix(*tensors[:8], indices, weights, activation)
    name = resolve_backend(backend, x.device)
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    gathered = small_batch.use_gathered(x.shape[0], name, recording)
    check_expert_mix(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                     lora_a_down, indices, weights, activation, host_read=gathered and not recording)
    if gathered:   # a few tokens: no routing plan
        return expert_mix_gathered(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up,
                                   lora_b_up, lora_a_down, indices, weights, scaling, activation)
    impl = reference if name == "reference" else _triton()
    return impl.expert_mix(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up,
                           lora_b_up, lora_a_down, indices, weights, scaling, activation)


def expert_ffn(x, gate_weight, up_weight, down_weight, lora_a_gate, lora_b_gate, lora_a_up,
               lora_b_up, lora_a_down, lora_b_down, indices, weights, scaling: float,
               activation: str, gate_bias=None, up_bias=None, down_bias=None,
               lora_input=None, backend: str | None = None):
    """y = sum_k w_k E_{e_k}(x): the GMoE expert FFN, frozen GEMMs applied once per token.

    gate_weight, up_weight: (F, H) frozen; down_weight: (H, F) frozen; biases optional.
    lora_b_down: (E, H, R). lora_input: (T, H) input of the LoRA shrinks when it differs
    from x (LoRA dropout); defaults to x. Other shapes as in `expert_mix`. Returns (T, H).
      y = W_d h_c + s · [z_1 … z_E] [B_d^1 … B_d^E]^T
    """
    gate_base = F.linear(x, gate_weight, gate_bias)
    up_base = F.linear(x, up_weight, up_bias)
    h_c, z = expert_mix(x if lora_input is None else lora_input, gate_base, up_base,
                        lora_a_gate, lora_b_gate, lora_a_up, lora_b_up, lora_a_down,
                        indices, weights, scaling, activation, backend)
    return F.linear(h_c, down_weight, down_bias) + stacked_down_lora(z, lora_b_down, scaling)


def stacked_down_lora(z, lora_b_down, scaling: float):
    """s · [z_1 … z_E] [B_d^1 … B_d^E]^T: the down LoRA of every expert as one (T, E·R) × (E·R, H) GEMM.

    z: (T, E·R) from `expert_mix`; lora_b_down: (E, H, R). Returns (T, H).
    Below R tokens (decoding) as E per-expert products summed, (E, T, R) x (E, R, H): stacking
    B_d copies E·R·H elements, more than the E·T·H of the products.
    """
    num_experts, hidden, rank = lora_b_down.shape
    if z.shape[0] < rank:
        per_expert = torch.bmm(z.view(-1, num_experts, rank).transpose(0, 1), lora_b_down.transpose(1, 2))
        return per_expert.sum(0).mul_(scaling)
    stacked_b_down = lora_b_down.permute(1, 0, 2).reshape(hidden, num_experts * rank)
    return scaling * (z @ stacked_b_down.t())


def graph_router(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                 score_weight, top_k: int, activation: str, backend: str | None = None,
                 layer1_constant=None, query_weight=None):
    """The GMoE graph router for every token.

    x:               (T, H)
    token_weight:    (G, H)  W_tok;  expert_weight: (G, H) W_exp
    expert_features: (E, H)  X, the frozen expert features
    adjacency:       (E+1, E+1) fp32 normalised Â (see `normalized_adjacency`), token node last
    gcn_weight:      (L, G, G) W_1 … W_L;  score_weight: (G,) w_p
    layer1_constant: (E+1, G) in x's compute dtype (fp32; fp64 for fp64 x), optional: the
                     token-independent C1 of `graph_router_constant`, reused instead of computed
                     from X and W_exp (the model's eval cache); no gradient reaches X or W_exp
                     through it unless it carries one
    query_weight:    (G, H)  W_q, optional, with score_weight None: the token-readout option. Each
                     token reads the expert nodes' last states N^L_i with its own vector,
                     ℓ_i = ⟨N^L_i, W_q x⟩, where the published router reads them all with one
                     vector w_p: ℓ_i = ⟨N^L_i, w_p⟩
    Returns logits (T, E) fp32, probs (T, E) fp32, indices (T, K) int64, weights (T, K) fp32.
    """
    check_graph_router(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                       score_weight, top_k, activation, query_weight)
    if layer1_constant is not None:
        check_layer1_constant(layer1_constant, x, expert_features.shape[0], gcn_weight.shape[1])
    impl = reference if resolve_backend(backend, x.device) == "reference" else _triton()
    return impl.graph_router(x, token_weight, expert_weight, expert_features, adjacency,
                             gcn_weight, score_weight, top_k, activation, layer1_constant,
                             query_weight=query_weight)


def graph_router_constant(expert_features, expert_weight, adjacency, gcn_weight, activation: str,
                          dtype=torch.float32):
    """C1 = (Â[:, :E] act(X W_exp^T)) W_1^T, (E+1, G) in `dtype` (fp32, or fp64 for fp64
    inputs): the part of the graph router's first layer that no token changes, computed with
    the ops every backend's router uses, so that passing it back as `graph_router`'s
    `layer1_constant` gives the same bits as letting the router compute it.

    expert_features: (E, H); expert_weight: (G, H); adjacency: (E+1, E+1) Â; gcn_weight: (L, G, G).
    """
    check_activation(activation)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (the router's compute dtypes), got {dtype}")
    return reference.layer1_constant(expert_features, expert_weight, adjacency, gcn_weight, activation, dtype)


def topk_route(probs, top_k: int, backend: str | None = None):
    """(T, E) probabilities -> indices (T, K) int64 and renormalised weights (T, K) fp32."""
    impl = reference if resolve_backend(backend, probs.device) == "reference" else _triton()
    return impl.topk_route(probs, top_k)


def make_routing_plan(indices, num_experts: int, backend: str | None = None) -> RoutingPlan:
    """Group (token, slot) pairs by expert: see `RoutingPlan`."""
    check_routing_indices(indices, num_experts)
    impl = reference if resolve_backend(backend, indices.device) == "reference" else _triton()
    return impl.make_routing_plan(indices, num_experts)


def dispatch(x, plan: RoutingPlan, backend: str | None = None):
    """(T, H) -> (T·K, H) rows grouped by expert."""
    impl = reference if resolve_backend(backend, x.device) == "reference" else _triton()
    return impl.dispatch(x, plan)


def combine(rows, weights, plan: RoutingPlan, backend: str | None = None):
    """(T·K, H) grouped rows -> (T, H) weighted sums over each token's K slots."""
    impl = reference if resolve_backend(backend, rows.device) == "reference" else _triton()
    return impl.combine(rows, weights, plan)


normalized_adjacency = reference.normalized_adjacency
