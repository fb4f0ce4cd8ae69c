"""Triton backend of the routing ops: top-K, routing plan, dispatch (gather), combine.

Same signatures and results as gmoe_kernels.reference.routing; top-K is the reference's own
`topk_route` (torch.topk is one fused kernel already). Nothing here synchronises with the
host: the plan's histogram, prefix sum and counting sort stay on the device, and expert ids
are checked by device-side assertions. dispatch and combine are the differentiable custom ops
`gmoe_kernels::dispatch` and `gmoe_kernels::combine` (gmoe_kernels.registration), which take
the plan's tensors, so torch.compile traces through them.
"""
from __future__ import annotations

import torch
import triton

from ..activations import compute_dtype
from ..backend import interpreting
from ..checks import check_expert_range
from ..reference.routing import topk_route
from ..registration import register_differentiable_op
from ..routing_plan import RoutingPlan
from . import _routing_kernels as kernels
from ._common import new_output, strides

__all__ = ["combine", "dispatch", "make_routing_plan", "topk_route"]

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
    check_expert_range(indices, num_experts)
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
            indices_ptr=flat, counts_ptr=counts, P=num_pairs, E=num_experts, BLOCK=_HIST_BLOCK)
        offsets[1:] = torch.cumsum(counts, 0)
        kernels._plan_scatter_kernel[(num_experts,)](
            indices_ptr=flat, expert_offsets_ptr=offsets, sorted_pairs_ptr=sorted_pairs,
            inverse_ptr=inverse, P=num_pairs, BLOCK=_HIST_BLOCK)
    return RoutingPlan(sorted_pairs, offsets, inverse, num_tokens, top_k, num_experts)


def gather_rows(src: torch.Tensor, sorted_pairs: torch.Tensor, top_k: int,
                scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """out[i] = src[sorted_pairs[i] // K] (· scale of that pair): (T·K, H)."""
    num_pairs = sorted_pairs.numel()
    hidden = src.shape[1]
    out = new_output((num_pairs, hidden), out_dtype, src.device)
    if num_pairs == 0 or hidden == 0:
        return out
    grid = (triton.cdiv(num_pairs, _ROWS_BLOCK_P), triton.cdiv(hidden, _ROWS_BLOCK_H))
    kernels._gather_rows_kernel[grid](
        src_ptr=src, sorted_pairs_ptr=sorted_pairs, scale_ptr=scale if scale is not None else src,
        out_ptr=out, P=num_pairs, H=hidden, K=top_k, **strides("src", src, "th"),
        **strides("scale", scale, "tk"), **strides("out", out, "ph"),
        HAS_SCALE=scale is not None, ACC_FP64=compute_dtype(src) == torch.float64,
        BLOCK_P=_ROWS_BLOCK_P, BLOCK_H=_ROWS_BLOCK_H)
    return out


def combine_rows(rows: torch.Tensor, inverse: torch.Tensor, num_tokens: int, top_k: int,
                 weights: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_k w[t, k] rows[inverse[t·K + k]] (w = 1 when weights is None): (T, H)."""
    hidden = rows.shape[1]
    out = new_output((num_tokens, hidden), out_dtype, rows.device)
    if num_tokens == 0 or hidden == 0:
        return out
    grid = (triton.cdiv(num_tokens, _ROWS_BLOCK_P), triton.cdiv(hidden, _ROWS_BLOCK_H))
    kernels._combine_rows_kernel[grid](
        rows_ptr=rows, inverse_ptr=inverse, weights_ptr=weights if weights is not None else rows,
        out_ptr=out, T=num_tokens, H=hidden, K=top_k, **strides("rows", rows, "ph"),
        **strides("weights", weights, "tk"), **strides("out", out, "th"),
        HAS_WEIGHTS=weights is not None, ACC_FP64=compute_dtype(rows) == torch.float64,
        BLOCK_T=_ROWS_BLOCK_P, BLOCK_H=_ROWS_BLOCK_H)
    return out


# ---- dispatch: torch.library registration (gmoe_kernels.registration) -----------------------

def _dispatch(x: torch.Tensor, sorted_pairs: torch.Tensor, inverse: torch.Tensor,
              top_k: int) -> torch.Tensor:
    return gather_rows(x, sorted_pairs, top_k, None, x.dtype)


def _dispatch_fake(x, sorted_pairs, inverse, top_k):
    return x.new_empty((sorted_pairs.shape[0], x.shape[1]))


def _dispatch_backward(grad_rows: torch.Tensor, inverse: torch.Tensor, num_tokens: int,
                       top_k: int) -> torch.Tensor:
    return combine_rows(grad_rows, inverse, num_tokens, top_k, None, grad_rows.dtype)


def _dispatch_backward_fake(grad_rows, inverse, num_tokens, top_k):
    return grad_rows.new_empty((num_tokens, grad_rows.shape[1]))


def _dispatch_setup_context(ctx, inputs, output):
    x, _, inverse, top_k = inputs
    ctx.save_for_backward(inverse)
    ctx.num_tokens, ctx.top_k = x.shape[0], top_k


def _dispatch_autograd_backward(ctx, grad_rows):
    """rows = x[sorted_pairs // K]. Backward: dx[t] = sum_k d_rows[inverse[t·K + k]] (the
    combine kernel with unit weights). No gradient for the plan's tensors."""
    (inverse,) = ctx.saved_tensors
    return _dispatch_backward_op(grad_rows, inverse, ctx.num_tokens, ctx.top_k), None, None, None


_dispatch_op, _dispatch_backward_op = register_differentiable_op(
    "dispatch", forward=_dispatch, forward_fake=_dispatch_fake, backward=_dispatch_backward,
    backward_fake=_dispatch_backward_fake, setup_context=_dispatch_setup_context,
    autograd_backward=_dispatch_autograd_backward)


# ---- combine: torch.library registration (gmoe_kernels.registration) ------------------------

def _combine(rows: torch.Tensor, weights: torch.Tensor, sorted_pairs: torch.Tensor,
             inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    return combine_rows(rows, inverse, weights.shape[0], top_k, weights, rows.dtype)


def _combine_fake(rows, weights, sorted_pairs, inverse, top_k):
    return rows.new_empty((weights.shape[0], rows.shape[1]))


def _combine_backward(grad_out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                      sorted_pairs: torch.Tensor, inverse: torch.Tensor, top_k: int,
                      ) -> list[torch.Tensor]:
    d_rows = gather_rows(grad_out, sorted_pairs, top_k, weights, rows.dtype)
    compute = compute_dtype(rows)
    per_pair = rows.index_select(0, inverse).view(weights.shape[0], top_k, -1)
    d_weights = (per_pair.to(compute) * grad_out.to(compute).unsqueeze(1)).sum(-1)
    return [d_rows, d_weights.to(weights.dtype)]


def _combine_backward_fake(grad_out, rows, weights, sorted_pairs, inverse, top_k):
    return [torch.empty_like(rows), torch.empty_like(weights)]


def _combine_setup_context(ctx, inputs, output):
    rows, weights, sorted_pairs, inverse, top_k = inputs
    ctx.save_for_backward(rows, weights, sorted_pairs, inverse)
    ctx.top_k = top_k


def _combine_autograd_backward(ctx, grad_out):
    """out[t] = sum_k w[t, k] rows[inverse[t·K + k]], fp32 accumulation. Backward (δ = dL/dout):
      d_rows[i]  = w[p_i] δ[p_i // K]          (p_i = sorted_pairs[i]; the gather kernel, scaled)
      d_w[t, k]  = <rows[inverse[t·K + k]], δ[t]>
    No gradient for the plan's tensors."""
    rows, weights, sorted_pairs, inverse = ctx.saved_tensors
    d_rows, d_weights = _combine_backward_op(grad_out, rows, weights, sorted_pairs, inverse,
                                             ctx.top_k)
    need = ctx.needs_input_grad
    return d_rows if need[0] else None, d_weights if need[1] else None, None, None, None


_combine_op, _combine_backward_op = register_differentiable_op(
    "combine", forward=_combine, forward_fake=_combine_fake, backward=_combine_backward,
    backward_fake=_combine_backward_fake, setup_context=_combine_setup_context,
    autograd_backward=_combine_autograd_backward)


# ---- public entry points ------------------------------------------------------------------

def dispatch(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Rows of x copied to the grouped layout, in plan.sorted_pairs order (gather kernel).

    x:    (T, H) any float dtype
    plan: RoutingPlan of T tokens
    returns (T·K, H) in x's dtype; differentiable w.r.t. x (the op `gmoe_kernels::dispatch`).
    """
    if x.dim() != 2 or x.shape[0] != plan.num_tokens:
        raise ValueError(f"x must be ({plan.num_tokens}, H), got {tuple(x.shape)}")
    return _dispatch_op(x, plan.sorted_pairs, plan.inverse, plan.top_k)


def combine(rows: torch.Tensor, weights: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Weighted sum back to tokens: out[t] = sum_k weights[t, k] · rows[inverse[t·K + k]].

    rows:    (T·K, H) float, grouped order (as `dispatch` returns)
    weights: (T, K) float
    plan:    RoutingPlan
    returns (T, H) in rows' dtype, summed in fp32 (fp64 for fp64 rows) by one kernel;
    differentiable w.r.t. rows and weights (the op `gmoe_kernels::combine`).
    """
    num_pairs = plan.num_tokens * plan.top_k
    if rows.dim() != 2 or rows.shape[0] != num_pairs:
        raise ValueError(f"rows must be ({num_pairs}, H), got {tuple(rows.shape)}")
    if tuple(weights.shape) != (plan.num_tokens, plan.top_k):
        raise ValueError(f"weights must be ({plan.num_tokens}, {plan.top_k}), "
                         f"got {tuple(weights.shape)}")
    return _combine_op(rows, weights, plan.sorted_pairs, plan.inverse, plan.top_k)
