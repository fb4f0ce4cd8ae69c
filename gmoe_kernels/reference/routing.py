"""Reference twins of the routing ops: top-K, the routing plan, gather and weighted combine."""
from __future__ import annotations

import torch

from ..activations import compute_dtype
from ..checks import check_expert_range
from ..routing_plan import RoutingPlan


def topk_route(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K experts per token with renormalised weights: the one implementation, which the
    Triton backend and its graph router use too (torch.topk is already one fused kernel).

    probs: (T, E) float  router probabilities (rows sum to 1)
    returns indices (T, K) int64 (ties broken as torch.topk does) and
            weights (T, K) float32 (fp64 for fp64 probs), p_k / sum_k p_k (differentiable w.r.t. probs).
    """
    p_k, indices = torch.topk(probs.to(compute_dtype(probs)), top_k, dim=-1)
    weights = p_k / p_k.sum(dim=-1, keepdim=True)
    return indices, weights


def make_routing_plan(indices: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Group the (token, slot) pairs of `indices` (T, K) int64 by expert.

    Histogram + prefix sum, with no host synchronisation.
    """
    check_expert_range(indices, num_experts)  # bincount would fail on them, unclearly
    num_tokens, top_k = indices.shape
    flat = indices.reshape(-1)
    # A stable sort keeps pairs of one expert in ascending pair (token) order.
    sorted_pairs = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = torch.cumsum(counts, 0)
    inverse = torch.empty_like(sorted_pairs)
    inverse[sorted_pairs] = torch.arange(flat.numel(), device=indices.device)
    return RoutingPlan(sorted_pairs, offsets, inverse, num_tokens, top_k, num_experts)


def dispatch(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Rows of x (T, H) copied to the grouped layout (T·K, H), in plan.sorted_pairs order."""
    return x.index_select(0, plan.sorted_pairs // plan.top_k)


def combine(rows: torch.Tensor, weights: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Weighted sum back to tokens: out[t] = sum_k weights[t, k] * rows[inverse[t·K + k]].

    rows: (T·K, H) in grouped order; weights: (T, K). Returns (T, H) in rows' dtype.
    """
    per_pair = rows.index_select(0, plan.inverse).view(plan.num_tokens, plan.top_k, rows.shape[1])
    compute = compute_dtype(rows)  # fp32, or fp64 for fp64 rows, as the kernel accumulates
    out = (per_pair.to(compute) * weights.to(compute).unsqueeze(-1)).sum(dim=1)
    return out.to(rows.dtype)
