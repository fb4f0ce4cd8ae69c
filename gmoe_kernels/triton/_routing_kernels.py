"""Triton kernels of the routing ops (only @triton.jit code; launchers in routing.py).

P = T·K (token, slot) pairs, pair id = token·K + slot. Expert ids outside [0, E) are
ignored (never counted, never placed), so a bad index cannot write out of bounds.
"""
import triton
import triton.language as tl


@triton.jit
def _histogram_kernel(indices_ptr, counts_ptr, P, E, BLOCK: tl.constexpr):
    """counts[e] += #{pairs of this block routed to e}: int32 atomics (relaxed: only the final
    counts matter, and integer sums do not depend on order), counts zero on entry."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    experts = tl.load(indices_ptr + offs, mask=mask, other=-1)
    valid = mask & (experts >= 0) & (experts < E)
    ones = tl.full((BLOCK,), 1, dtype=tl.int32)
    tl.atomic_add(counts_ptr + experts, ones, mask=valid, sem="relaxed")


@triton.jit
def _plan_scatter_kernel(indices_ptr, expert_offsets_ptr, sorted_pairs_ptr, inverse_ptr, P,
                         BLOCK: tl.constexpr):
    """One program per expert e: place e's pairs at expert_offsets[e] + rank, rank = how
    many earlier pairs also went to e (a stable counting sort: ascending pair id)."""
    expert = tl.program_id(0).to(tl.int64)
    base = tl.load(expert_offsets_ptr + expert)
    seen = base * 0  # int64 running count of e's pairs in earlier blocks
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < P
        experts = tl.load(indices_ptr + offs, mask=mask, other=-1)
        hit = mask & (experts == expert)
        rank = tl.cumsum(hit.to(tl.int32), axis=0).to(tl.int64) - 1
        dest = base + seen + rank
        tl.store(sorted_pairs_ptr + dest, offs, mask=hit)
        tl.store(inverse_ptr + offs, dest, mask=hit)
        seen += tl.sum(hit.to(tl.int64), axis=0)


@triton.jit
def _gather_rows_kernel(src_ptr, sorted_pairs_ptr, scale_ptr, out_ptr, P, H, K,
                        stride_src_t, stride_src_h, stride_scale_t, stride_scale_k,
                        stride_out_p, stride_out_h,
                        HAS_SCALE: tl.constexpr, ACC_FP64: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[i] = src[pairs[i] // K] (· scale[pairs[i] // K, pairs[i] % K] when HAS_SCALE,
    multiplied in fp32, fp64 for fp64 inputs)."""
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_p = offs_p < P
    mask = mask_p[:, None] & (offs_h < H)[None, :]
    pairs = tl.load(sorted_pairs_ptr + offs_p, mask=mask_p, other=0)
    tok = pairs // K
    rows = tl.load(src_ptr + tok[:, None] * stride_src_t + offs_h[None, :] * stride_src_h,
                   mask=mask, other=0.0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + tok * stride_scale_t + (pairs % K) * stride_scale_k,
                        mask=mask_p, other=0.0).to(ACC_DTYPE)
        rows = rows.to(ACC_DTYPE) * scale[:, None]
    tl.store(out_ptr + offs_p[:, None] * stride_out_p + offs_h[None, :] * stride_out_h,
             rows.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_rows_kernel(rows_ptr, inverse_ptr, weights_ptr, out_ptr, T, H, K,
                         stride_rows_p, stride_rows_h, stride_weights_t, stride_weights_k,
                         stride_out_t, stride_out_h,
                         HAS_WEIGHTS: tl.constexpr, ACC_FP64: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_k w[t, k] · rows[inverse[t·K + k]] (w = 1 without HAS_WEIGHTS), summed
    in fp32 (fp64 for fp64 rows) and written once."""
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_h < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=ACC_DTYPE)
    for k in range(K):
        pos = tl.load(inverse_ptr + offs_t * K + k, mask=mask_t, other=0)
        rows = tl.load(rows_ptr + pos[:, None] * stride_rows_p + offs_h[None, :] * stride_rows_h,
                       mask=mask, other=0.0).to(ACC_DTYPE)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + offs_t * stride_weights_t + k * stride_weights_k, mask=mask_t,
                        other=0.0).to(ACC_DTYPE)
            rows = rows * w[:, None]
        acc += rows
    tl.store(out_ptr + offs_t[:, None] * stride_out_t + offs_h[None, :] * stride_out_h,
             acc.to(out_ptr.dtype.element_ty), mask=mask)
