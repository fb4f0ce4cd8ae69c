"""Triton backend of the routing ops: top-K, routing plan, dispatch (gather), combine.

Same signatures and results as gmoe_kernels.reference.routing; top-K is the reference's own
`topk_route` (torch.topk is one fused kernel already). Nothing here synchronises with the
host: the plan's histogram, prefix sum and counting sort stay on the device, and expert ids
are checked by device-side assertions.
"""
from __future__ import annotations

import os

import torch
import triton

from ..activations import compute_dtype
from ..backend import interpreting
from ..checks import _check_expert_range
from ..reference.routing import topk_route
from ..routing_plan import RoutingPlan
from . import _routing_kernels as kernels

__all__ = ["combine", "dispatch", "make_routing_plan", "topk_route"]


def poisoning() -> bool:
    """GMOE_POISON=1: outputs the kernels must fully write start as NaN (-1 for integers), so
    an element a kernel forgets fails the tests. Read at every call."""
    return os.environ.get("GMOE_POISON", "0") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer every element of which a kernel writes (poisoned under GMOE_POISON=1)."""
    if poisoning():
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_HIST_BLOCK = 128 if interpreting() else 1024
_ROWS_BLOCK_P = 16 if interpreting() else 32
_ROWS_BLOCK_H = 32 if interpreting() else 128


def make_routing_plan(indices: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Group the (token, slot) pairs of `indices` by expert, with no host synchronisation.

    indices:     (T, K) int64  chosen experts
    num_experts: int           E
    Histogram (int32 atomics), prefix sum (torch.cumsum on the device), then a stable
    counting sort: one program per expert places its pairs in ascending pair id.
    The kernels skip ids outside [0, E), which would leave `inverse` unwritten: they are
    refused here, and RoutingPlan asserts that no pair was dropped (both device-side).
    """
    if indices.dtype != torch.int64 or indices.dim() != 2:
        raise TypeError(f"indices must be a (T, K) int64 tensor, got {indices.dtype} "
                        f"{tuple(indices.shape)}")
    _check_expert_range(indices, num_experts)
    num_tokens, top_k = indices.shape
    num_pairs = num_tokens * top_k
    device = indices.device
    flat = indices.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    sorted_pairs = new_output((num_pairs,), torch.int64, device)
    inverse = new_output((num_pairs,), torch.int64, device)
    if num_pairs > 0 and num_experts > 0:
        kernels._histogram_kernel[(triton.cdiv(num_pairs, _HIST_BLOCK),)](
            flat, counts, num_pairs, num_experts, BLOCK=_HIST_BLOCK)
        offsets[1:] = torch.cumsum(counts, 0)
        kernels._plan_scatter_kernel[(num_experts,)](
            flat, offsets, sorted_pairs, inverse, num_pairs, BLOCK=_HIST_BLOCK)
    return RoutingPlan(sorted_pairs, offsets, inverse, num_tokens, top_k, num_experts)


def _gather_rows(src: torch.Tensor, plan: RoutingPlan, scale: torch.Tensor | None,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """out[i] = src[plan.sorted_pairs[i] // K] (· scale of that pair): (T·K, H)."""
    num_pairs = plan.sorted_pairs.numel()
    hidden = src.shape[1]
    out = new_output((num_pairs, hidden), out_dtype, src.device)
    if num_pairs == 0 or hidden == 0:
        return out
    scale_arg = scale if scale is not None else src
    grid = (triton.cdiv(num_pairs, _ROWS_BLOCK_P), triton.cdiv(hidden, _ROWS_BLOCK_H))
    kernels._gather_rows_kernel[grid](
        src, plan.sorted_pairs, scale_arg, out, num_pairs, hidden, plan.top_k,
        src.stride(0), src.stride(1),
        scale.stride(0) if scale is not None else 0, scale.stride(1) if scale is not None else 0,
        out.stride(0), out.stride(1),
        HAS_SCALE=scale is not None, ACC_FP64=compute_dtype(src) == torch.float64,
        BLOCK_P=_ROWS_BLOCK_P, BLOCK_H=_ROWS_BLOCK_H)
    return out


def _combine_rows(rows: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_k w[t, k] rows[inverse[t·K + k]] (w = 1 when weights is None): (T, H)."""
    num_tokens, hidden = plan.num_tokens, rows.shape[1]
    out = new_output((num_tokens, hidden), out_dtype, rows.device)
    if num_tokens == 0 or hidden == 0:
        return out
    w_arg = weights if weights is not None else rows
    grid = (triton.cdiv(num_tokens, _ROWS_BLOCK_P), triton.cdiv(hidden, _ROWS_BLOCK_H))
    kernels._combine_rows_kernel[grid](
        rows, plan.inverse, w_arg, out, num_tokens, hidden, plan.top_k,
        rows.stride(0), rows.stride(1),
        weights.stride(0) if weights is not None else 0,
        weights.stride(1) if weights is not None else 0,
        out.stride(0), out.stride(1),
        HAS_WEIGHTS=weights is not None, ACC_FP64=compute_dtype(rows) == torch.float64,
        BLOCK_T=_ROWS_BLOCK_P, BLOCK_H=_ROWS_BLOCK_H)
    return out


class DispatchFunction(torch.autograd.Function):
    """rows = x[sorted_pairs // K].

    Backward: dx[t] = sum_k d_rows[inverse[t·K + k]] (the combine kernel with unit weights).
    """

    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan = plan
        return _gather_rows(x, plan, None, x.dtype)

    @staticmethod
    def backward(ctx, grad_rows):
        return _combine_rows(grad_rows, ctx.plan, None, grad_rows.dtype), None


class CombineFunction(torch.autograd.Function):
    """out[t] = sum_k w[t, k] rows[inverse[t·K + k]], fp32 accumulation.

    Backward (δ = dL/dout):
      d_rows[i]  = w[p_i] δ[p_i // K]          (p_i = sorted_pairs[i]; the gather kernel, scaled)
      d_w[t, k]  = <rows[inverse[t·K + k]], δ[t]>
    """

    @staticmethod
    def forward(ctx, rows, weights, plan):
        ctx.save_for_backward(rows, weights)
        ctx.plan = plan
        return _combine_rows(rows, plan, weights, rows.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weights = ctx.saved_tensors
        plan = ctx.plan
        d_rows = d_weights = None
        if ctx.needs_input_grad[0]:
            d_rows = _gather_rows(grad_out, plan, weights, rows.dtype)
        if ctx.needs_input_grad[1]:
            acc = compute_dtype(rows)
            per_pair = rows.index_select(0, plan.inverse).view(plan.num_tokens, plan.top_k, -1)
            d_weights = (per_pair.to(acc) * grad_out.to(acc).unsqueeze(1)).sum(-1)
            d_weights = d_weights.to(weights.dtype)
        return d_rows, d_weights, None


def dispatch(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Rows of x copied to the grouped layout, in plan.sorted_pairs order (gather kernel).

    x:    (T, H) any float dtype
    plan: RoutingPlan of T tokens
    returns (T·K, H) in x's dtype; differentiable w.r.t. x.
    """
    if x.dim() != 2 or x.shape[0] != plan.num_tokens:
        raise ValueError(f"x must be ({plan.num_tokens}, H), got {tuple(x.shape)}")
    return DispatchFunction.apply(x, plan)


def combine(rows: torch.Tensor, weights: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Weighted sum back to tokens: out[t] = sum_k weights[t, k] · rows[inverse[t·K + k]].

    rows:    (T·K, H) float, grouped order (as `dispatch` returns)
    weights: (T, K) float
    plan:    RoutingPlan
    returns (T, H) in rows' dtype, summed in fp32 (fp64 for fp64 rows) by one kernel;
    differentiable w.r.t. rows and weights.
    """
    num_pairs = plan.num_tokens * plan.top_k
    if rows.dim() != 2 or rows.shape[0] != num_pairs:
        raise ValueError(f"rows must be ({num_pairs}, H), got {tuple(rows.shape)}")
    if tuple(weights.shape) != (plan.num_tokens, plan.top_k):
        raise ValueError(f"weights must be ({plan.num_tokens}, {plan.top_k}), "
                         f"got {tuple(weights.shape)}")
    return CombineFunction.apply(rows, weights, plan)
