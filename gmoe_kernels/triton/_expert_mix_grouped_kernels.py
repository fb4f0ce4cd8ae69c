"""Expert-grouped variant of the expert-mix token kernels (only @triton.jit code).

Same inputs and the same per-slot outputs as the gather and dot kernels, but a program owns
a tile of at most BLOCK_P (token, slot) pairs of ONE expert (routing-plan order, as
grouped-GEMM MoE kernels do), so every LoRA product is one small dense tl.dot against that
expert's own matrices: 2·R FLOPs per (pair, f) per matrix, no one-hot waste, no per-token
gather of B rows. The price: a token's K pairs sit in K different tiles, so the per-token
sums over slots (h_c in the forward, dG and dU in the backward) are fp32 atomic adds into
zeroed (T, F) buffers (relaxed: no ordering is needed, only the sum), and each pair re-reads
its token's G, U (and dh_c) rows. The per-pair reductions over F (a_d, dw, d(shrink)) stay in
registers over the program's F split and are written once, as in the other variants.

The atomics make the slot-sum order vary run to run: the launcher never picks this variant
when torch.are_deterministic_algorithms_enabled().

Tile lookup: tile_offsets (E+1,) gives expert e the tiles tile_offsets[e] .. [e+1]-1, tile j
of it holding the expert's pairs j·BLOCK_P .. (j+1)·BLOCK_P-1; programs past the last tile
return. Per-pair outputs go to (SPLIT, T·K, ·) buffers at the pair id t·K + k, which is the
(SPLIT, T, K, ·) slot layout of the token kernels.
"""
import triton
import triton.language as tl

from ._activation_kernels import act as _act
from ._activation_kernels import act_and_grad as _act_and_grad
from ._expert_mix_kernels import dot_acc, f_tile


@triton.jit
def _pair_tile(sorted_pairs_ptr, expert_offsets_ptr, tile_offsets_ptr, weights_ptr,
               stride_weights_t, stride_weights_k, E, K: tl.constexpr, E_PAD: tl.constexpr,
               BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(expert, pair ids, tokens, weights, pair mask) of this program's tile; expert = E
    (nothing to do) for a program past the last tile."""
    tile = tl.program_id(0)
    offs_e = tl.arange(0, E_PAD)
    ends = tl.load(tile_offsets_ptr + 1 + offs_e, mask=offs_e < E, other=2**62)
    expert = tl.sum((ends <= tile).to(tl.int32), axis=0).to(tl.int64)
    safe = tl.minimum(expert, E - 1)
    start = (tl.load(expert_offsets_ptr + safe)
             + (tile - tl.load(tile_offsets_ptr + safe)) * BLOCK_P)
    end = tl.minimum(start + BLOCK_P, tl.load(expert_offsets_ptr + safe + 1))
    pos = start + tl.arange(0, BLOCK_P)
    mask_p = pos < end   # empty past the last tile: then end <= start
    pairs = tl.load(sorted_pairs_ptr + pos, mask=mask_p, other=0).to(tl.int64)
    tok = pairs // K
    w = tl.load(weights_ptr + tok * stride_weights_t + (pairs % K) * stride_weights_k, mask=mask_p,
                other=0.0).to(ACC_DTYPE)
    return expert, pairs, tok, w, mask_p


@triton.jit
def _pair_blocks(ptr, col0, tok, expert, mask_p, stride_t, stride_c, R: tl.constexpr,
                 R_PAD: tl.constexpr):
    """(BLOCK_P, R_PAD): each pair's row ptr[t, col0 + e·R + r] of its expert's block."""
    offs_r = tl.arange(0, R_PAD)
    cols = col0 + expert * R + offs_r[None, :]
    return tl.load(ptr + tok[:, None] * stride_t + cols * stride_c,
                   mask=mask_p[:, None] & (offs_r < R)[None, :], other=0.0)


@triton.jit
def _store_pairs(ptr, acc, pairs, mask_p, T, K: tl.constexpr, N: tl.constexpr,
                 N_PAD: tl.constexpr):
    """acc (BLOCK_P, N_PAD) to row program_id(1) of a contiguous (SPLIT, T·K, N) buffer."""
    offs_n = tl.arange(0, N_PAD)
    ptrs = (ptr + tl.program_id(1).to(tl.int64) * T * K * N + pairs[:, None] * N
            + offs_n[None, :])
    tl.store(ptrs, acc, mask=mask_p[:, None] & (offs_n < N)[None, :])


@triton.jit
def _load_rows(ptr, tok, offs_f, mask_pf, stride_t, stride_f, ACC_DTYPE: tl.constexpr):
    return tl.load(ptr + tok[:, None] * stride_t + offs_f[None, :] * stride_f, mask=mask_pf,
                   other=0.0).to(ACC_DTYPE)


@triton.jit
def _load_expert_rf(ptr, expert, offs_r, mask_r, offs_f, mask_f, stride_e, stride_r, stride_f):
    """Expert e's (R_PAD, BLOCK_F) tile M[e, r, f] (strides given as r, f)."""
    return tl.load(ptr + expert * stride_e + offs_r[:, None] * stride_r + offs_f[None, :] * stride_f,
                   mask=mask_r[:, None] & mask_f[None, :], other=0.0)


@triton.jit
def _expand_pairs(base_ptr, stride_base_t, stride_base_f, small, m_ptr, stride_m_e, stride_m_r,
                  stride_m_f, expert, tok, offs_r, mask_r, offs_f, mask_f, mask_pf,
                  ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """(base[t, f] + small @ M^e[:, f] for the tile's pairs, the M^e tile): one dense expand
    against expert e's (R_PAD, BLOCK_F) tile of a matrix read as M[e, r, f]."""
    m = _load_expert_rf(m_ptr, expert, offs_r, mask_r, offs_f, mask_f, stride_m_e, stride_m_r,
                        stride_m_f)
    base = _load_rows(base_ptr, tok, offs_f, mask_pf, stride_base_t, stride_base_f, ACC_DTYPE)
    return dot_acc(small, m, base, DOT_DTYPE), m


@triton.jit
def _expert_mix_fwd_grouped_kernel(
    gate_base_ptr, up_base_ptr, shrink_ptr, lora_b_gate_ptr, lora_b_up_ptr, lora_a_down_ptr,
    sorted_pairs_ptr, expert_offsets_ptr, tile_offsets_ptr, weights_ptr, h_c_ptr, slot_a_d_ptr,
    T, E, F, UP_OFFSET, T_BUCKET,
    stride_gate_base_t, stride_gate_base_f, stride_up_base_t, stride_up_base_f,
    stride_shrink_t, stride_shrink_c,
    stride_lora_b_gate_e, stride_lora_b_gate_f, stride_lora_b_gate_r,
    stride_lora_b_up_e, stride_lora_b_up_f, stride_lora_b_up_r,
    stride_lora_a_down_e, stride_lora_a_down_r, stride_lora_a_down_f,
    stride_weights_t, stride_weights_k, stride_h_c_t, stride_h_c_f,
    K: tl.constexpr, R: tl.constexpr, ACTIVATION: tl.constexpr, R_PAD: tl.constexpr,
    E_PAD: tl.constexpr, ACC_FP64: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One (pair tile of expert e, F split): h_c[t] += w_k h_k (fp32 atomics into a zeroed
    (T, F) buffer) and slot_a_d[split, t·K + k] = w_k sum_{f in split} A_d^e[:, f] h_k[f]."""
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    expert, pairs, tok, w, mask_p = _pair_tile(sorted_pairs_ptr, expert_offsets_ptr,
                                               tile_offsets_ptr, weights_ptr, stride_weights_t,
                                               stride_weights_k, E, K, E_PAD, BLOCK_P, ACC_DTYPE)
    if expert >= E:
        return
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    s_gate = _pair_blocks(shrink_ptr, 0, tok, expert, mask_p, stride_shrink_t, stride_shrink_c, R,
                          R_PAD)
    s_up = _pair_blocks(shrink_ptr, UP_OFFSET, tok, expert, mask_p, stride_shrink_t,
                        stride_shrink_c, R,
                        R_PAD)
    a_d_acc = tl.zeros((BLOCK_P, R_PAD), dtype=ACC_DTYPE)
    for f0 in range(tl.program_id(1) * BLOCK_F, F, tl.num_programs(1) * BLOCK_F):
        offs_f, mask_f = f_tile(f0, F, BLOCK_F)
        mask_pf = mask_p[:, None] & mask_f[None, :]
        g, _ = _expand_pairs(gate_base_ptr, stride_gate_base_t, stride_gate_base_f, s_gate, lora_b_gate_ptr,
                             stride_lora_b_gate_e, stride_lora_b_gate_r, stride_lora_b_gate_f,
                             expert, tok, offs_r, mask_r,
                             offs_f, mask_f, mask_pf, ACC_DTYPE, DOT_DTYPE)
        u, _ = _expand_pairs(up_base_ptr, stride_up_base_t, stride_up_base_f, s_up, lora_b_up_ptr, stride_lora_b_up_e,
                             stride_lora_b_up_r, stride_lora_b_up_f, expert, tok, offs_r, mask_r,
                             offs_f, mask_f,
                             mask_pf, ACC_DTYPE, DOT_DTYPE)
        h = tl.where(mask_pf, _act(g, ACTIVATION) * u, 0.0)
        tl.atomic_add(h_c_ptr + tok[:, None] * stride_h_c_t + offs_f[None, :] * stride_h_c_f,
                      w[:, None] * h, mask=mask_pf, sem="relaxed")
        a_down = _load_expert_rf(lora_a_down_ptr, expert, offs_r, mask_r, offs_f, mask_f,
                                 stride_lora_a_down_e, stride_lora_a_down_r, stride_lora_a_down_f)
        a_d_acc = dot_acc(h, tl.trans(a_down), a_d_acc, DOT_DTYPE)
    _store_pairs(slot_a_d_ptr, w[:, None] * a_d_acc, pairs, mask_p, T, K, R, R_PAD)


@triton.jit
def _expert_mix_bwd_grouped_kernel(
    gate_base_ptr, up_base_ptr, shrink_ptr, lora_b_gate_ptr, lora_b_up_ptr, lora_a_down_ptr,
    sorted_pairs_ptr, expert_offsets_ptr, tile_offsets_ptr, weights_ptr, grad_h_c_ptr,
    grad_z_ptr, d_gate_base_ptr, d_up_base_ptr, slot_d_shrink_gate_ptr, slot_d_shrink_up_ptr,
    slot_d_weights_ptr,
    T, E, F, UP_OFFSET, T_BUCKET,
    stride_gate_base_t, stride_gate_base_f, stride_up_base_t, stride_up_base_f,
    stride_shrink_t, stride_shrink_c,
    stride_lora_b_gate_e, stride_lora_b_gate_f, stride_lora_b_gate_r,
    stride_lora_b_up_e, stride_lora_b_up_f, stride_lora_b_up_r,
    stride_lora_a_down_e, stride_lora_a_down_r, stride_lora_a_down_f,
    stride_weights_t, stride_weights_k, stride_grad_h_c_t, stride_grad_h_c_f,
    stride_grad_z_t, stride_grad_z_c, stride_d_gate_base_t, stride_d_gate_base_f,
    stride_d_up_base_t, stride_d_up_base_f,
    K: tl.constexpr, R: tl.constexpr, ACTIVATION: tl.constexpr, R_PAD: tl.constexpr,
    E_PAD: tl.constexpr, ACC_FP64: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One (pair tile of expert e, F split) of the backward (maths as the token kernels):
    dG[t] += dg_k, dU[t] += du_k (fp32 atomics into zeroed (T, F) buffers); per pair, over the
    split's F tiles: dw = <h, q>, d(shrink_g) = B_g^e^T dg, d(shrink_u) = B_u^e^T du."""
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    expert, pairs, tok, w, mask_p = _pair_tile(sorted_pairs_ptr, expert_offsets_ptr,
                                               tile_offsets_ptr, weights_ptr, stride_weights_t,
                                               stride_weights_k, E, K, E_PAD, BLOCK_P, ACC_DTYPE)
    if expert >= E:
        return
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    s_gate = _pair_blocks(shrink_ptr, 0, tok, expert, mask_p, stride_shrink_t, stride_shrink_c, R,
                          R_PAD)
    s_up = _pair_blocks(shrink_ptr, UP_OFFSET, tok, expert, mask_p, stride_shrink_t,
                        stride_shrink_c, R,
                        R_PAD)
    b = _pair_blocks(grad_z_ptr, 0, tok, expert, mask_p, stride_grad_z_t, stride_grad_z_c, R, R_PAD)
    dw_acc = tl.zeros((BLOCK_P, 1), dtype=ACC_DTYPE)
    dsg_acc = tl.zeros((BLOCK_P, R_PAD), dtype=ACC_DTYPE)
    dsu_acc = tl.zeros((BLOCK_P, R_PAD), dtype=ACC_DTYPE)
    for f0 in range(tl.program_id(1) * BLOCK_F, F, tl.num_programs(1) * BLOCK_F):
        offs_f, mask_f = f_tile(f0, F, BLOCK_F)
        mask_pf = mask_p[:, None] & mask_f[None, :]
        g, b_gate_t = _expand_pairs(gate_base_ptr, stride_gate_base_t, stride_gate_base_f, s_gate, lora_b_gate_ptr,
                                    stride_lora_b_gate_e, stride_lora_b_gate_r,
                                    stride_lora_b_gate_f, expert, tok, offs_r,
                                    mask_r, offs_f, mask_f, mask_pf, ACC_DTYPE, DOT_DTYPE)
        u, b_up_t = _expand_pairs(up_base_ptr, stride_up_base_t, stride_up_base_f, s_up, lora_b_up_ptr,
                                  stride_lora_b_up_e, stride_lora_b_up_r, stride_lora_b_up_f,
                                  expert, tok, offs_r,
                                  mask_r, offs_f, mask_f, mask_pf, ACC_DTYPE, DOT_DTYPE)
        q, _ = _expand_pairs(grad_h_c_ptr, stride_grad_h_c_t, stride_grad_h_c_f, b,
                             lora_a_down_ptr, stride_lora_a_down_e, stride_lora_a_down_r,
                             stride_lora_a_down_f, expert, tok, offs_r, mask_r, offs_f, mask_f,
                             mask_pf, ACC_DTYPE, DOT_DTYPE)
        act_g, act_grad = _act_and_grad(g, ACTIVATION)
        dh = w[:, None] * q
        dg = tl.where(mask_pf, dh * u * act_grad, 0.0)
        du = tl.where(mask_pf, dh * act_g, 0.0)
        tl.atomic_add(d_gate_base_ptr + tok[:, None] * stride_d_gate_base_t + offs_f[None, :] * stride_d_gate_base_f,
                      dg, mask=mask_pf, sem="relaxed")
        tl.atomic_add(d_up_base_ptr + tok[:, None] * stride_d_up_base_t + offs_f[None, :] * stride_d_up_base_f,
                      du, mask=mask_pf, sem="relaxed")
        dw_acc += tl.sum(tl.where(mask_pf, act_g * u * q, 0.0), axis=1)[:, None]
        dsg_acc = dot_acc(dg, tl.trans(b_gate_t), dsg_acc, DOT_DTYPE)
        dsu_acc = dot_acc(du, tl.trans(b_up_t), dsu_acc, DOT_DTYPE)
    _store_pairs(slot_d_weights_ptr, dw_acc, pairs, mask_p, T, K, 1, 1)
    _store_pairs(slot_d_shrink_gate_ptr, dsg_acc, pairs, mask_p, T, K, R, R_PAD)
    _store_pairs(slot_d_shrink_up_ptr, dsu_acc, pairs, mask_p, T, K, R, R_PAD)
