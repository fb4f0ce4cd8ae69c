"""Triton kernels of the fused expert mix (only @triton.jit code; launchers in expert_mix.py).

Notation as in DESIGN.md: T tokens, F intermediate, E experts, K top-k, R LoRA rank.
R is padded to the constexpr R_PAD (a power of two; at least 16 where tl.dot needs it) with
masks, K to K_PAD; the user's weights are never padded. All arithmetic runs in the
accumulation dtype (fp32, or fp64 when ACC_FP64 is set for fp64 inputs); values are converted
on load and on store.

The LoRA shrinks arrive pre-scaled: shrink (T, 2·E·R) = s · x [A_g; A_u]^T, gate columns
first (expert e, rank r at column e·R + r), up columns from UP_OFFSET = E·R on. So the
expand is g_k = G + B_g^{e_k} shrink_g and no kernel needs s.

Token kernels (forward, backward) run over (token tile, F split) programs: every token of
a tile may pick another expert, so the expert's B rows are gathered per token into a
[BLOCK_T, BLOCK_F, R_PAD] tile and reduced on CUDA cores (R is small). Split s walks the F
tiles s, s + SPLIT, ... and keeps the reductions over F (a_d, dw, d(shrink)) per slot in
registers, [BLOCK_T, K_PAD, R_PAD]; it writes them once to its own row of a (SPLIT, T, K, ·)
partial buffer, which the launcher sums in a fixed order: no atomics, bitwise reproducible.

The per-expert weight-gradient kernel runs over (chunk, F tile) programs: a chunk is at most
CHUNK consecutive pairs of one expert in routing-plan order (so one hot expert spreads over
many programs); it sums dB_g, dB_u, dA_d over its pairs with tl.dot (16-bit operands when
the data are 16-bit, fp32 accumulation) and writes per-chunk partials, which
`_sum_chunks_kernel` adds per expert in chunk order.
"""
import triton
import triton.language as tl

from ._activation_kernels import act as _act
from ._activation_kernels import act_and_grad as _act_and_grad


@triton.jit
def token_tile(T, BLOCK_T: tl.constexpr):
    """Token offsets (int64) and mask of this program's token tile (grid axis 0)."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    return offs_t, offs_t < T


@triton.jit
def load_tf(ptr, offs_t, offs_f, mask_tf, stride_t, stride_f, ACC_DTYPE: tl.constexpr):
    """A (BLOCK_T, BLOCK_F) tile of a (T, F) tensor, converted to ACC_DTYPE."""
    return tl.load(ptr + offs_t[:, None] * stride_t + offs_f[None, :] * stride_f,
                   mask=mask_tf, other=0.0).to(ACC_DTYPE)


@triton.jit
def f_tile(f0, F, BLOCK_F: tl.constexpr):
    """Offsets (int64) and mask of the F tile starting at f0."""
    offs_f = f0 + tl.arange(0, BLOCK_F).to(tl.int64)
    return offs_f, offs_f < F


@triton.jit
def add_to_slot(acc, k, value, K_PAD: tl.constexpr):
    """acc[:, k] += value for a (BLOCK_T, K_PAD, N) accumulator and a (BLOCK_T, N) value."""
    hit = (tl.arange(0, K_PAD) == k)[None, :, None]
    return tl.where(hit, acc + value[:, None, :], acc)


@triton.jit
def store_slots(ptr, acc, T, K, N, K_PAD: tl.constexpr, N_PAD: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """Write this program's (BLOCK_T, K_PAD, N_PAD) per-slot accumulator to its row
    (program_id(1)) of a contiguous (SPLIT, T, K, N) partial buffer. The offsets are
    recomputed here rather than kept live across the F loop (ptxas spilled them)."""
    split = tl.program_id(1)
    offs_t, mask_t = token_tile(T, BLOCK_T)
    offs_k = tl.arange(0, K_PAD)
    offs_n = tl.arange(0, N_PAD)
    ptrs = (ptr + split.to(tl.int64) * T * K * N + offs_t[:, None, None] * (K * N)
            + offs_k[None, :, None] * N + offs_n[None, None, :])
    mask = mask_t[:, None, None] & (offs_k < K)[None, :, None] & (offs_n < N)[None, None, :]
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def load_slot(indices_ptr, weights_ptr, k, offs_t, mask_t, stride_indices_t, stride_indices_k,
              stride_weights_t, stride_weights_k, ACC_DTYPE: tl.constexpr):
    """Slot k's expert (int64, -1 for rows past T) and weight (ACC_DTYPE) per token."""
    experts = tl.load(indices_ptr + offs_t * stride_indices_t + k * stride_indices_k,
                      mask=mask_t, other=-1).to(tl.int64)
    w = tl.load(weights_ptr + offs_t * stride_weights_t + k * stride_weights_k,
                mask=mask_t, other=0.0).to(ACC_DTYPE)
    return experts, w


@triton.jit
def _gather_expand(shrink_ptr, col0, b_ptr, experts, offs_t, offs_f, offs_r, mask_t, mask_f,
                   mask_r, R, stride_shrink_t, stride_shrink_c, stride_b_e, stride_b_f, stride_b_r,
                   ACC_DTYPE: tl.constexpr):
    """Per-token expand: out[t, f] = sum_r shrink[t, col0 + e_t·R + r] · B[e_t, f, r].

    Returns the expand (BLOCK_T, BLOCK_F), the shrink tile (BLOCK_T, R_PAD) and the
    gathered B tile (BLOCK_T, BLOCK_F, R_PAD), all in ACC_DTYPE.
    """
    cols = col0 + experts[:, None] * R + offs_r[None, :]
    a = tl.load(shrink_ptr + offs_t[:, None] * stride_shrink_t + cols * stride_shrink_c,
                mask=mask_t[:, None] & mask_r[None, :], other=0.0).to(ACC_DTYPE)
    b_ptrs = (b_ptr + experts[:, None, None] * stride_b_e + offs_f[None, :, None] * stride_b_f
              + offs_r[None, None, :] * stride_b_r)
    mask3 = mask_t[:, None, None] & mask_f[None, :, None] & mask_r[None, None, :]
    b = tl.load(b_ptrs, mask=mask3, other=0.0).to(ACC_DTYPE)
    return tl.sum(a[:, None, :] * b, axis=2), a, b


@triton.jit
def _gather_rows_r(ptr, experts, offs_f, mask_f, offs_r, mask_r, stride_e, stride_f, stride_r,
                   mask_t, ACC_DTYPE: tl.constexpr):
    """The (BLOCK_T, BLOCK_F, R_PAD) tile M[e_t, f, r] of an (E, F, R)-strided tensor."""
    ptrs = (ptr + experts[:, None, None] * stride_e + offs_f[None, :, None] * stride_f
            + offs_r[None, None, :] * stride_r)
    mask = mask_t[:, None, None] & mask_f[None, :, None] & mask_r[None, None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)


@triton.jit
def _expert_mix_fwd_kernel(
    gate_base_ptr, up_base_ptr, shrink_ptr, lora_b_gate_ptr, lora_b_up_ptr, lora_a_down_ptr,
    indices_ptr, weights_ptr, h_c_ptr, slot_a_d_ptr,
    T, F, UP_OFFSET, T_BUCKET,
    stride_gate_base_t, stride_gate_base_f, stride_up_base_t, stride_up_base_f,
    stride_shrink_t, stride_shrink_c,
    stride_lora_b_gate_e, stride_lora_b_gate_f, stride_lora_b_gate_r,
    stride_lora_b_up_e, stride_lora_b_up_f, stride_lora_b_up_r,
    stride_lora_a_down_e, stride_lora_a_down_r, stride_lora_a_down_f,
    stride_indices_t, stride_indices_k, stride_weights_t, stride_weights_k,
    stride_h_c_t, stride_h_c_f,
    K: tl.constexpr, R: tl.constexpr, ACTIVATION: tl.constexpr, R_PAD: tl.constexpr,
    K_PAD: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One (token tile, F split): h_c = sum_k w_k act(g_k) u_k for the split's F tiles, each
    written once; slot_a_d[split, t, k] = w_k sum_{f in split} A_d^{e_k}[:, f] h_k[f].

    T_BUCKET is unused here: it is in the autotune key, so decoding and training sizes tune
    apart. slot_a_d is a contiguous (SPLIT, T, K, R) buffer in the accumulation dtype.
    """
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    split = tl.program_id(1)
    offs_t, mask_t = token_tile(T, BLOCK_T)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    a_d_acc = tl.zeros((BLOCK_T, K_PAD, R_PAD), dtype=ACC_DTYPE)
    for f0 in range(split * BLOCK_F, F, tl.num_programs(1) * BLOCK_F):
        offs_f, mask_f = f_tile(f0, F, BLOCK_F)
        mask_tf = mask_t[:, None] & mask_f[None, :]
        gate = load_tf(gate_base_ptr, offs_t, offs_f, mask_tf, stride_gate_base_t,
                       stride_gate_base_f, ACC_DTYPE)
        up = load_tf(up_base_ptr, offs_t, offs_f, mask_tf, stride_up_base_t, stride_up_base_f,
                     ACC_DTYPE)
        h_c = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
        for k in tl.static_range(K):  # unrolled: ptxas spilled less (compile gate)
            experts, w = load_slot(indices_ptr, weights_ptr, k, offs_t, mask_t, stride_indices_t,
                                   stride_indices_k, stride_weights_t, stride_weights_k, ACC_DTYPE)
            eg, _, _ = _gather_expand(shrink_ptr, 0, lora_b_gate_ptr, experts, offs_t, offs_f, offs_r,
                                      mask_t, mask_f, mask_r, R, stride_shrink_t, stride_shrink_c,
                                      stride_lora_b_gate_e, stride_lora_b_gate_f,
                                      stride_lora_b_gate_r, ACC_DTYPE)
            eu, _, _ = _gather_expand(shrink_ptr, UP_OFFSET, lora_b_up_ptr, experts, offs_t, offs_f,
                                      offs_r, mask_t, mask_f, mask_r, R, stride_shrink_t,
                                      stride_shrink_c, stride_lora_b_up_e, stride_lora_b_up_f,
                                      stride_lora_b_up_r,
                                      ACC_DTYPE)
            h = _act(gate + eg, ACTIVATION) * (up + eu)
            h_c += w[:, None] * h
            a_down = _gather_rows_r(lora_a_down_ptr, experts, offs_f, mask_f, offs_r, mask_r,
                                    stride_lora_a_down_e, stride_lora_a_down_f,
                                    stride_lora_a_down_r, mask_t, ACC_DTYPE)
            a_d_acc = add_to_slot(a_d_acc, k, w[:, None] * tl.sum(h[:, :, None] * a_down, axis=1),
                                  K_PAD)
        tl.store(h_c_ptr + offs_t[:, None] * stride_h_c_t + offs_f[None, :] * stride_h_c_f,
                 h_c.to(h_c_ptr.dtype.element_ty), mask=mask_tf)
    store_slots(slot_a_d_ptr, a_d_acc, T, K, R, K_PAD, R_PAD, BLOCK_T)


# Longer than 80 lines on purpose: one F-tile loop carries the per-slot accumulators in
# registers, which a @triton.jit helper could only return anew, not update (each split-off
# step would pass a dozen tiles in and out); the signature, one stride per tensor
# dimension, is a fifth of it.
@triton.jit
def _expert_mix_bwd_token_kernel(
    gate_base_ptr, up_base_ptr, shrink_ptr, lora_b_gate_ptr, lora_b_up_ptr, lora_a_down_ptr,
    indices_ptr, weights_ptr, grad_h_c_ptr, grad_z_ptr, d_gate_base_ptr, d_up_base_ptr,
    slot_d_shrink_gate_ptr, slot_d_shrink_up_ptr, slot_d_weights_ptr,
    T, F, UP_OFFSET, T_BUCKET,
    stride_gate_base_t, stride_gate_base_f, stride_up_base_t, stride_up_base_f,
    stride_shrink_t, stride_shrink_c,
    stride_lora_b_gate_e, stride_lora_b_gate_f, stride_lora_b_gate_r,
    stride_lora_b_up_e, stride_lora_b_up_f, stride_lora_b_up_r,
    stride_lora_a_down_e, stride_lora_a_down_r, stride_lora_a_down_f,
    stride_indices_t, stride_indices_k, stride_weights_t, stride_weights_k,
    stride_grad_h_c_t, stride_grad_h_c_f, stride_grad_z_t, stride_grad_z_c,
    stride_d_gate_base_t, stride_d_gate_base_f, stride_d_up_base_t, stride_d_up_base_f,
    K: tl.constexpr, R: tl.constexpr, ACTIVATION: tl.constexpr, R_PAD: tl.constexpr,
    K_PAD: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One (token tile, F split) of the backward: per-token and per-pair gradients.

    Recomputes g_k, u_k, h_k; with q_k = dh_c + A_d^{e_k}^T b_k (b_k = grad_z block e_k):
      dG = sum_k dg_k, dU = sum_k du_k            written once per F tile (plain stores)
      slot_d_weights[split, t, k] = sum_{f in split} h_k q_k          (SPLIT, T, K)
      slot_d_shrink_gate[split, t, k] = sum_{f in split} B_g^{e_k}^T dg_k   (SPLIT, T, K, R)
      slot_d_shrink_up[split, t, k]   = sum_{f in split} B_u^{e_k}^T du_k   (SPLIT, T, K, R)
    with dh_k = w_k q_k, dg_k = dh_k u_k act'(g_k), du_k = dh_k act(g_k).
    """
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    split = tl.program_id(1)
    offs_t, mask_t = token_tile(T, BLOCK_T)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    mask_tr = mask_t[:, None] & mask_r[None, :]
    dw_acc = tl.zeros((BLOCK_T, K_PAD, 1), dtype=ACC_DTYPE)
    dsg_acc = tl.zeros((BLOCK_T, K_PAD, R_PAD), dtype=ACC_DTYPE)
    dsu_acc = tl.zeros((BLOCK_T, K_PAD, R_PAD), dtype=ACC_DTYPE)
    for f0 in range(split * BLOCK_F, F, tl.num_programs(1) * BLOCK_F):
        offs_f, mask_f = f_tile(f0, F, BLOCK_F)
        mask_tf = mask_t[:, None] & mask_f[None, :]
        gate = load_tf(gate_base_ptr, offs_t, offs_f, mask_tf, stride_gate_base_t,
                       stride_gate_base_f, ACC_DTYPE)
        up = load_tf(up_base_ptr, offs_t, offs_f, mask_tf, stride_up_base_t, stride_up_base_f,
                     ACC_DTYPE)
        d_h_c = load_tf(grad_h_c_ptr, offs_t, offs_f, mask_tf, stride_grad_h_c_t, stride_grad_h_c_f,
                        ACC_DTYPE)
        d_gate = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
        d_up = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
        for k in range(K):  # not unrolled: unrolled, K 8 needed over 255 registers
            experts, w = load_slot(indices_ptr, weights_ptr, k, offs_t, mask_t, stride_indices_t,
                                   stride_indices_k, stride_weights_t, stride_weights_k, ACC_DTYPE)
            eg, _, b_gate = _gather_expand(shrink_ptr, 0, lora_b_gate_ptr, experts, offs_t, offs_f,
                                           offs_r, mask_t, mask_f, mask_r, R, stride_shrink_t,
                                           stride_shrink_c, stride_lora_b_gate_e,
                                           stride_lora_b_gate_f, stride_lora_b_gate_r,
                                           ACC_DTYPE)
            eu, _, b_up = _gather_expand(shrink_ptr, UP_OFFSET, lora_b_up_ptr, experts, offs_t, offs_f,
                                         offs_r, mask_t, mask_f, mask_r, R, stride_shrink_t,
                                         stride_shrink_c, stride_lora_b_up_e, stride_lora_b_up_f,
                                         stride_lora_b_up_r,
                                         ACC_DTYPE)
            u = up + eu
            # q = dh_c + A_d^T b, b = grad_z[t, e_t·R + r]
            cols = experts[:, None] * R + offs_r[None, :]
            b = tl.load(grad_z_ptr + offs_t[:, None] * stride_grad_z_t + cols * stride_grad_z_c,
                        mask=mask_tr, other=0.0).to(ACC_DTYPE)
            a_down = _gather_rows_r(lora_a_down_ptr, experts, offs_f, mask_f, offs_r, mask_r,
                                    stride_lora_a_down_e, stride_lora_a_down_f,
                                    stride_lora_a_down_r, mask_t, ACC_DTYPE)
            q = d_h_c + tl.sum(b[:, None, :] * a_down, axis=2)
            act_g, act_grad = _act_and_grad(gate + eg, ACTIVATION)
            dh = w[:, None] * q
            dg = dh * u * act_grad
            du = dh * act_g
            dw_acc = add_to_slot(dw_acc, k, tl.sum(act_g * u * q, axis=1)[:, None], K_PAD)
            dsg_acc = add_to_slot(dsg_acc, k, tl.sum(dg[:, :, None] * b_gate, axis=1), K_PAD)
            dsu_acc = add_to_slot(dsu_acc, k, tl.sum(du[:, :, None] * b_up, axis=1), K_PAD)
            d_gate += dg
            d_up += du
        tl.store(d_gate_base_ptr + offs_t[:, None] * stride_d_gate_base_t + offs_f[None, :] * stride_d_gate_base_f,
                 d_gate.to(d_gate_base_ptr.dtype.element_ty), mask=mask_tf)
        tl.store(d_up_base_ptr + offs_t[:, None] * stride_d_up_base_t + offs_f[None, :] * stride_d_up_base_f,
                 d_up.to(d_up_base_ptr.dtype.element_ty), mask=mask_tf)
    store_slots(slot_d_weights_ptr, dw_acc, T, K, 1, K_PAD, 1, BLOCK_T)
    store_slots(slot_d_shrink_gate_ptr, dsg_acc, T, K, R, K_PAD, R_PAD, BLOCK_T)
    store_slots(slot_d_shrink_up_ptr, dsu_acc, T, K, R, K_PAD, R_PAD, BLOCK_T)


@triton.jit
def dot_acc(a, b, acc, DOT_DTYPE: tl.constexpr):
    """acc + a @ b with operands cast to DOT_DTYPE: 16-bit operands on tensor cores with
    fp32 accumulation, or IEEE fp32/fp64 (never TF32) when DOT_DTYPE is fp32/fp64."""
    if DOT_DTYPE == tl.float32 or DOT_DTYPE == tl.float64:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


# Longer than 80 lines on purpose: the pair-block loop carries three tl.dot accumulators
# (dB_g, dB_u, dA_d) in registers across iterations, and the chunk lookup, the expert
# tile loads and the loop share a dozen offsets and masks; the signature, one stride per
# tensor dimension, is a quarter of it.
@triton.jit
def _expert_mix_bwd_expert_kernel(
    gate_base_ptr, up_base_ptr, shrink_ptr, lora_b_gate_ptr, lora_b_up_ptr, lora_a_down_ptr,
    sorted_pairs_ptr, expert_offsets_ptr, chunk_offsets_ptr, weights_ptr, grad_h_c_ptr,
    grad_z_ptr, part_b_gate_ptr, part_b_up_ptr, part_a_down_ptr,
    E, F, UP_OFFSET, CHUNK, T_BUCKET,
    stride_gate_base_t, stride_gate_base_f, stride_up_base_t, stride_up_base_f,
    stride_shrink_t, stride_shrink_c,
    stride_lora_b_gate_e, stride_lora_b_gate_f, stride_lora_b_gate_r,
    stride_lora_b_up_e, stride_lora_b_up_f, stride_lora_b_up_r,
    stride_lora_a_down_e, stride_lora_a_down_r, stride_lora_a_down_f,
    stride_weights_t, stride_weights_k, stride_grad_h_c_t, stride_grad_h_c_f,
    stride_grad_z_t, stride_grad_z_c,
    K: tl.constexpr, R: tl.constexpr, ACTIVATION: tl.constexpr, R_PAD: tl.constexpr,
    E_PAD: tl.constexpr, ACC_FP64: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One (chunk, F tile): the chunk's share of dB_g^e, dB_u^e, dA_d^e, written once.

    chunk_offsets (E+1,): expert e owns chunks chunk_offsets[e] .. chunk_offsets[e+1]-1, chunk
    j of it being its pairs j·CHUNK .. (j+1)·CHUNK-1 in routing-plan order; programs past the
    last chunk return. Over the chunk's pairs, in blocks of BLOCK_P, it recomputes g, u, h, dg,
    du (B^e is shared by all of them, so the products are tl.dots) and sums
      part_b_gate[chunk] = sum dg shrink_g^T (shrink pre-scaled by s)   (F, R), up likewise
      part_a_down[chunk] = sum (w b) h^T                                 (R, F)
    in registers, into contiguous partial buffers in the accumulation dtype. T_BUCKET is
    unused: it keys the autotuning (CHUNK changes with T too often to be a key).
    """
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    chunk = tl.program_id(0)
    offs_e = tl.arange(0, E_PAD)
    ends = tl.load(chunk_offsets_ptr + 1 + offs_e, mask=offs_e < E, other=2**62)
    expert = tl.sum((ends <= chunk).to(tl.int32), axis=0).to(tl.int64)
    if expert >= E:
        return
    first_chunk = tl.load(chunk_offsets_ptr + expert)
    start = tl.load(expert_offsets_ptr + expert) + (chunk - first_chunk) * CHUNK
    end = tl.minimum(start + CHUNK, tl.load(expert_offsets_ptr + expert + 1))

    offs_f = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_r = tl.arange(0, R_PAD)
    offs_p = tl.arange(0, BLOCK_P)
    mask_f = offs_f < F
    mask_r = offs_r < R
    mask_fr = mask_f[:, None] & mask_r[None, :]
    mask_rf = mask_r[:, None] & mask_f[None, :]
    b_gate_t = tl.load(lora_b_gate_ptr + expert * stride_lora_b_gate_e + offs_r[:, None] * stride_lora_b_gate_r
                       + offs_f[None, :] * stride_lora_b_gate_f, mask=mask_rf, other=0.0)
    b_up_t = tl.load(lora_b_up_ptr + expert * stride_lora_b_up_e + offs_r[:, None] * stride_lora_b_up_r
                     + offs_f[None, :] * stride_lora_b_up_f, mask=mask_rf, other=0.0)
    a_down = tl.load(lora_a_down_ptr + expert * stride_lora_a_down_e + offs_r[:, None] * stride_lora_a_down_r
                     + offs_f[None, :] * stride_lora_a_down_f, mask=mask_rf, other=0.0)
    acc_b_gate = tl.zeros((BLOCK_F, R_PAD), dtype=ACC_DTYPE)
    acc_b_up = tl.zeros((BLOCK_F, R_PAD), dtype=ACC_DTYPE)
    acc_a_down = tl.zeros((R_PAD, BLOCK_F), dtype=ACC_DTYPE)
    cols = expert * R + offs_r[None, :]
    for p0 in range(start, end, BLOCK_P):
        pos = p0 + offs_p
        mask_p = pos < end
        pairs = tl.load(sorted_pairs_ptr + pos, mask=mask_p, other=0).to(tl.int64)
        tok = pairs // K
        w = tl.load(weights_ptr + tok * stride_weights_t + (pairs % K) * stride_weights_k,
                    mask=mask_p, other=0.0).to(ACC_DTYPE)
        mask_pr = mask_p[:, None] & mask_r[None, :]
        mask_pf = mask_p[:, None] & mask_f[None, :]
        sh_ptrs = shrink_ptr + tok[:, None] * stride_shrink_t
        s_gate = tl.load(sh_ptrs + cols * stride_shrink_c, mask=mask_pr, other=0.0)
        s_up = tl.load(sh_ptrs + (UP_OFFSET + cols) * stride_shrink_c, mask=mask_pr, other=0.0)
        b = tl.load(grad_z_ptr + tok[:, None] * stride_grad_z_t + cols * stride_grad_z_c, mask=mask_pr,
                    other=0.0)
        g = tl.load(gate_base_ptr + tok[:, None] * stride_gate_base_t + offs_f[None, :] * stride_gate_base_f,
                    mask=mask_pf, other=0.0).to(ACC_DTYPE)
        g = dot_acc(s_gate, b_gate_t, g, DOT_DTYPE)
        u = tl.load(up_base_ptr + tok[:, None] * stride_up_base_t + offs_f[None, :] * stride_up_base_f,
                    mask=mask_pf, other=0.0).to(ACC_DTYPE)
        u = dot_acc(s_up, b_up_t, u, DOT_DTYPE)
        q = tl.load(grad_h_c_ptr + tok[:, None] * stride_grad_h_c_t + offs_f[None, :] * stride_grad_h_c_f,
                    mask=mask_pf, other=0.0).to(ACC_DTYPE)
        q = dot_acc(b, a_down, q, DOT_DTYPE)
        act_g, act_grad = _act_and_grad(g, ACTIVATION)
        dh = w[:, None] * q
        acc_a_down = dot_acc(tl.trans(w[:, None] * b.to(ACC_DTYPE)), act_g * u, acc_a_down,
                             DOT_DTYPE)
        acc_b_gate = dot_acc(tl.trans(dh * u * act_grad), s_gate, acc_b_gate, DOT_DTYPE)
        acc_b_up = dot_acc(tl.trans(dh * act_g), s_up, acc_b_up, DOT_DTYPE)

    fr = chunk.to(tl.int64) * F * R + offs_f[:, None] * R + offs_r[None, :]
    tl.store(part_b_gate_ptr + fr, acc_b_gate, mask=mask_fr)
    tl.store(part_b_up_ptr + fr, acc_b_up, mask=mask_fr)
    tl.store(part_a_down_ptr + chunk.to(tl.int64) * R * F + offs_r[:, None] * F + offs_f[None, :],
             acc_a_down, mask=mask_rf)


@triton.jit
def _sum_chunks_kernel(part_ptr, chunk_offsets_ptr, out_ptr, M, BLOCK: tl.constexpr):
    """out[e, m] = sum of part[c, m] over expert e's chunks c, in chunk order (zero when e
    has none): part (N_CHUNKS, M) and out (E, M), both contiguous."""
    expert = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
    for c in range(tl.load(chunk_offsets_ptr + expert), tl.load(chunk_offsets_ptr + expert + 1)):
        acc += tl.load(part_ptr + c * M + offs, mask=mask, other=0.0)
    tl.store(out_ptr + expert * M + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
