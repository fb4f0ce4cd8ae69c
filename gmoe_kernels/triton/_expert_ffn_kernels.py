"""Triton kernels of the fused expert mix (only @triton.jit code; launchers in expert_ffn.py).

Notation as in DESIGN.md: T tokens, F intermediate, E experts, K top-k, R LoRA rank.
R is padded to the constexpr R_PAD (a power of two, at least 16) with masks; the user's
weights are never padded. All arithmetic runs in the accumulation dtype (fp32, or fp64
when ACC_FP64 is set for fp64 inputs); values are converted on load and on store.

The LoRA shrinks arrive pre-scaled: shrink (T, 2·E·R) = s · x [A_g; A_u]^T, gate columns
first (expert e, rank r at column e·R + r), up columns from UP_OFFSET = E·R on. So the
expand is g_k = G + B_g^{e_k} shrink_g and no kernel needs s.

Token kernels (forward, backward) run over (token tile, F tile) programs: every token of
a tile may pick another expert, so the expert's B rows are gathered per token into a
[BLOCK_T, BLOCK_F, R_PAD] tile and reduced on CUDA cores (R is small). The per-expert
weight-gradient kernel runs over (expert, F tile) programs, walks the expert's pairs in
routing-plan order and uses tl.dot (block dims >= 16).
"""
import triton
import triton.language as tl

from ._activation_kernels import act as _act
from ._activation_kernels import act_and_grad as _act_and_grad


@triton.jit
def token_tile(T, F, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """Offsets and masks of this (token tile, F tile) program, offsets in int64."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_t = offs_t < T
    mask_f = offs_f < F
    return offs_t, offs_f, mask_t, mask_f, mask_t[:, None] & mask_f[None, :]


@triton.jit
def load_tf(ptr, offs_t, offs_f, mask_tf, stride_t, stride_f, ACC_DTYPE: tl.constexpr):
    """A (BLOCK_T, BLOCK_F) tile of a (T, F) tensor, converted to ACC_DTYPE."""
    return tl.load(ptr + offs_t[:, None] * stride_t + offs_f[None, :] * stride_f,
                   mask=mask_tf, other=0.0).to(ACC_DTYPE)


@triton.jit
def load_slot(indices_ptr, weights_ptr, k, offs_t, mask_t, stride_idx_t, stride_idx_k,
              stride_w_t, stride_w_k, ACC_DTYPE: tl.constexpr):
    """Slot k's expert (int64, -1 for rows past T) and weight (ACC_DTYPE) per token."""
    experts = tl.load(indices_ptr + offs_t * stride_idx_t + k * stride_idx_k,
                      mask=mask_t, other=-1).to(tl.int64)
    w = tl.load(weights_ptr + offs_t * stride_w_t + k * stride_w_k,
                mask=mask_t, other=0.0).to(ACC_DTYPE)
    return experts, w


@triton.jit
def _gather_expand(shrink_ptr, col0, b_ptr, experts, offs_t, offs_f, offs_r, mask_t, mask_f,
                   mask_r, R, stride_sh_t, stride_sh_c, stride_b_e, stride_b_f, stride_b_r,
                   ACC_DTYPE: tl.constexpr):
    """Per-token expand: out[t, f] = sum_r shrink[t, col0 + e_t·R + r] · B[e_t, f, r].

    Returns the expand (BLOCK_T, BLOCK_F), the shrink tile (BLOCK_T, R_PAD) and the
    gathered B tile (BLOCK_T, BLOCK_F, R_PAD), all in ACC_DTYPE.
    """
    cols = col0 + experts[:, None] * R + offs_r[None, :]
    a = tl.load(shrink_ptr + offs_t[:, None] * stride_sh_t + cols * stride_sh_c,
                mask=mask_t[:, None] & mask_r[None, :], other=0.0).to(ACC_DTYPE)
    b_ptrs = (b_ptr + experts[:, None, None] * stride_b_e + offs_f[None, :, None] * stride_b_f
              + offs_r[None, None, :] * stride_b_r)
    mask3 = mask_t[:, None, None] & mask_f[None, :, None] & mask_r[None, None, :]
    b = tl.load(b_ptrs, mask=mask3, other=0.0).to(ACC_DTYPE)
    return tl.sum(a[:, None, :] * b, axis=2), a, b


@triton.jit
def _expert_mix_fwd_kernel(
    gate_base_ptr, up_base_ptr, shrink_ptr, b_gate_ptr, b_up_ptr, a_down_ptr,
    indices_ptr, weights_ptr, h_c_ptr, z_ptr,
    T, F, K, R, UP_OFFSET,
    stride_gb_t, stride_gb_f, stride_ub_t, stride_ub_f, stride_sh_t, stride_sh_c,
    stride_bg_e, stride_bg_f, stride_bg_r, stride_bu_e, stride_bu_f, stride_bu_r,
    stride_ad_e, stride_ad_r, stride_ad_f, stride_idx_t, stride_idx_k, stride_w_t, stride_w_k,
    stride_hc_t, stride_hc_f, stride_z_t, stride_z_c,
    ACTIVATION: tl.constexpr, R_PAD: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One (token tile, F tile): h_c = sum_k w_k act(g_k) u_k, written once; z += w_k A_d h_k.

    z is an fp32/fp64 accumulator, zero on entry: the per-pair a_d = A_d^{e_k} h_k is a
    reduction over F, summed across F-tile programs with atomics, straight into the
    expert's block of z (scaled by w_k).
    """
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    offs_t, offs_f, mask_t, mask_f, mask_tf = token_tile(T, F, BLOCK_T, BLOCK_F)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R

    gate = load_tf(gate_base_ptr, offs_t, offs_f, mask_tf, stride_gb_t, stride_gb_f, ACC_DTYPE)
    up = load_tf(up_base_ptr, offs_t, offs_f, mask_tf, stride_ub_t, stride_ub_f, ACC_DTYPE)
    h_c = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
    for k in range(K):
        experts, w = load_slot(indices_ptr, weights_ptr, k, offs_t, mask_t, stride_idx_t,
                               stride_idx_k, stride_w_t, stride_w_k, ACC_DTYPE)
        eg, _, _ = _gather_expand(shrink_ptr, 0, b_gate_ptr, experts, offs_t, offs_f, offs_r,
                                  mask_t, mask_f, mask_r, R, stride_sh_t, stride_sh_c,
                                  stride_bg_e, stride_bg_f, stride_bg_r, ACC_DTYPE)
        eu, _, _ = _gather_expand(shrink_ptr, UP_OFFSET, b_up_ptr, experts, offs_t, offs_f,
                                  offs_r, mask_t, mask_f, mask_r, R, stride_sh_t, stride_sh_c,
                                  stride_bu_e, stride_bu_f, stride_bu_r, ACC_DTYPE)
        h = _act(gate + eg, ACTIVATION) * (up + eu)
        h_c += w[:, None] * h
        # a_d partial over this F tile: sum_f h[t, f] A_d[e_t, r, f]
        ad_ptrs = (a_down_ptr + experts[:, None, None] * stride_ad_e
                   + offs_f[None, :, None] * stride_ad_f + offs_r[None, None, :] * stride_ad_r)
        mask3 = mask_tf[:, :, None] & mask_r[None, None, :]
        a_down = tl.load(ad_ptrs, mask=mask3, other=0.0).to(ACC_DTYPE)
        a_d = tl.sum(h[:, :, None] * a_down, axis=1)
        cols = experts[:, None] * R + offs_r[None, :]
        tl.atomic_add(z_ptr + offs_t[:, None] * stride_z_t + cols * stride_z_c, w[:, None] * a_d,
                      mask=mask_t[:, None] & mask_r[None, :])
    tl.store(h_c_ptr + offs_t[:, None] * stride_hc_t + offs_f[None, :] * stride_hc_f,
             h_c.to(h_c_ptr.dtype.element_ty), mask=mask_tf)


@triton.jit
def _expert_mix_bwd_token_kernel(
    gate_base_ptr, up_base_ptr, shrink_ptr, b_gate_ptr, b_up_ptr, a_down_ptr,
    indices_ptr, weights_ptr, grad_h_c_ptr, grad_z_ptr,
    d_gate_base_ptr, d_up_base_ptr, d_shrink_ptr, d_weights_ptr,
    T, F, K, R, UP_OFFSET,
    stride_gb_t, stride_gb_f, stride_ub_t, stride_ub_f, stride_sh_t, stride_sh_c,
    stride_bg_e, stride_bg_f, stride_bg_r, stride_bu_e, stride_bu_f, stride_bu_r,
    stride_ad_e, stride_ad_r, stride_ad_f, stride_idx_t, stride_idx_k, stride_w_t, stride_w_k,
    stride_dhc_t, stride_dhc_f, stride_dz_t, stride_dz_c,
    stride_dgb_t, stride_dgb_f, stride_dub_t, stride_dub_f, stride_dsh_t, stride_dsh_c,
    stride_dw_t, stride_dw_k,
    ACTIVATION: tl.constexpr, R_PAD: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One (token tile, F tile) of the backward: per-token and per-pair gradients.

    Recomputes g_k, u_k, h_k; with q_k = dh_c + A_d^{e_k}^T b_k (b_k = grad_z block e_k):
      dG = sum_k dg_k, dU = sum_k du_k        written once (plain stores)
      dw_k += <h_k, q_k> over this F tile      fp32/fp64 atomics into d_weights (zero on entry)
      d_shrink[t, e_k block] += B^{e_k}^T dg_k  fp32/fp64 atomics into d_shrink (zero on entry)
    with dh_k = w_k q_k, dg_k = dh_k u_k act'(g_k), du_k = dh_k act(g_k).
    """
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    offs_t, offs_f, mask_t, mask_f, mask_tf = token_tile(T, F, BLOCK_T, BLOCK_F)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    mask_tr = mask_t[:, None] & mask_r[None, :]

    gate = load_tf(gate_base_ptr, offs_t, offs_f, mask_tf, stride_gb_t, stride_gb_f, ACC_DTYPE)
    up = load_tf(up_base_ptr, offs_t, offs_f, mask_tf, stride_ub_t, stride_ub_f, ACC_DTYPE)
    d_h_c = load_tf(grad_h_c_ptr, offs_t, offs_f, mask_tf, stride_dhc_t, stride_dhc_f, ACC_DTYPE)
    d_gate = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
    d_up = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
    for k in range(K):
        experts, w = load_slot(indices_ptr, weights_ptr, k, offs_t, mask_t, stride_idx_t,
                               stride_idx_k, stride_w_t, stride_w_k, ACC_DTYPE)
        eg, _, b_gate = _gather_expand(shrink_ptr, 0, b_gate_ptr, experts, offs_t, offs_f,
                                       offs_r, mask_t, mask_f, mask_r, R, stride_sh_t,
                                       stride_sh_c, stride_bg_e, stride_bg_f, stride_bg_r,
                                       ACC_DTYPE)
        eu, _, b_up = _gather_expand(shrink_ptr, UP_OFFSET, b_up_ptr, experts, offs_t, offs_f,
                                     offs_r, mask_t, mask_f, mask_r, R, stride_sh_t, stride_sh_c,
                                     stride_bu_e, stride_bu_f, stride_bu_r, ACC_DTYPE)
        g = gate + eg
        u = up + eu
        # q = dh_c + A_d^T b, b = grad_z[t, e_t·R + r]
        cols = experts[:, None] * R + offs_r[None, :]
        b = tl.load(grad_z_ptr + offs_t[:, None] * stride_dz_t + cols * stride_dz_c,
                    mask=mask_tr, other=0.0).to(ACC_DTYPE)
        ad_ptrs = (a_down_ptr + experts[:, None, None] * stride_ad_e
                   + offs_f[None, :, None] * stride_ad_f + offs_r[None, None, :] * stride_ad_r)
        mask3 = mask_tf[:, :, None] & mask_r[None, None, :]
        a_down = tl.load(ad_ptrs, mask=mask3, other=0.0).to(ACC_DTYPE)
        q = d_h_c + tl.sum(b[:, None, :] * a_down, axis=2)
        act_g, act_grad = _act_and_grad(g, ACTIVATION)
        h = act_g * u
        tl.atomic_add(d_weights_ptr + offs_t * stride_dw_t + k * stride_dw_k,
                      tl.sum(h * q, axis=1), mask=mask_t)
        dh = w[:, None] * q
        dg = dh * u * act_grad
        du = dh * act_g
        d_gate += dg
        d_up += du
        d_sg = tl.sum(dg[:, :, None] * b_gate, axis=1)
        d_su = tl.sum(du[:, :, None] * b_up, axis=1)
        dsh_ptrs = d_shrink_ptr + offs_t[:, None] * stride_dsh_t
        tl.atomic_add(dsh_ptrs + cols * stride_dsh_c, d_sg, mask=mask_tr)
        tl.atomic_add(dsh_ptrs + (UP_OFFSET + cols) * stride_dsh_c, d_su, mask=mask_tr)
    tl.store(d_gate_base_ptr + offs_t[:, None] * stride_dgb_t + offs_f[None, :] * stride_dgb_f,
             d_gate.to(d_gate_base_ptr.dtype.element_ty), mask=mask_tf)
    tl.store(d_up_base_ptr + offs_t[:, None] * stride_dub_t + offs_f[None, :] * stride_dub_f,
             d_up.to(d_up_base_ptr.dtype.element_ty), mask=mask_tf)


@triton.jit
def _expert_mix_bwd_expert_kernel(
    gate_base_ptr, up_base_ptr, shrink_ptr, b_gate_ptr, b_up_ptr, a_down_ptr,
    sorted_pairs_ptr, expert_offsets_ptr, weights_ptr, grad_h_c_ptr, grad_z_ptr,
    d_b_gate_ptr, d_b_up_ptr, d_a_down_ptr,
    F, K, R, UP_OFFSET,
    stride_gb_t, stride_gb_f, stride_ub_t, stride_ub_f, stride_sh_t, stride_sh_c,
    stride_bg_e, stride_bg_f, stride_bg_r, stride_bu_e, stride_bu_f, stride_bu_r,
    stride_ad_e, stride_ad_r, stride_ad_f, stride_w_t, stride_w_k,
    stride_dhc_t, stride_dhc_f, stride_dz_t, stride_dz_c,
    stride_dbg_e, stride_dbg_f, stride_dbg_r, stride_dbu_e, stride_dbu_f, stride_dbu_r,
    stride_dad_e, stride_dad_r, stride_dad_f,
    ACTIVATION: tl.constexpr, R_PAD: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One (expert e, F tile): dB_g^e, dB_u^e, dA_d^e over the expert's pairs, written once.

    Walks sorted_pairs[expert_offsets[e] : expert_offsets[e+1]] in blocks of BLOCK_P,
    recomputes g, u, h, dg, du for those pairs (B^e is shared, so tl.dot applies) and sums
    in registers: deterministic, no atomics. An expert with no pairs writes zeros.
      dB_g^e = sum dg shrink_g^T   (shrink pre-scaled by s)    dB_u^e likewise
      dA_d^e = sum (w b) h^T
    """
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    expert = tl.program_id(0).to(tl.int64)
    pid_f = tl.program_id(1)
    offs_f = pid_f.to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_r = tl.arange(0, R_PAD)
    offs_p = tl.arange(0, BLOCK_P)
    mask_f = offs_f < F
    mask_r = offs_r < R
    mask_fr = mask_f[:, None] & mask_r[None, :]

    b_gate = tl.load(b_gate_ptr + expert * stride_bg_e + offs_f[:, None] * stride_bg_f
                     + offs_r[None, :] * stride_bg_r, mask=mask_fr, other=0.0).to(ACC_DTYPE)
    b_up = tl.load(b_up_ptr + expert * stride_bu_e + offs_f[:, None] * stride_bu_f
                   + offs_r[None, :] * stride_bu_r, mask=mask_fr, other=0.0).to(ACC_DTYPE)
    a_down = tl.load(a_down_ptr + expert * stride_ad_e + offs_r[:, None] * stride_ad_r
                     + offs_f[None, :] * stride_ad_f, mask=mask_r[:, None] & mask_f[None, :],
                     other=0.0).to(ACC_DTYPE)
    acc_b_gate = tl.zeros((BLOCK_F, R_PAD), dtype=ACC_DTYPE)
    acc_b_up = tl.zeros((BLOCK_F, R_PAD), dtype=ACC_DTYPE)
    acc_a_down = tl.zeros((R_PAD, BLOCK_F), dtype=ACC_DTYPE)

    start = tl.load(expert_offsets_ptr + expert).to(tl.int32)
    end = tl.load(expert_offsets_ptr + expert + 1).to(tl.int32)
    for p0 in range(start, end, BLOCK_P):
        pos = p0 + offs_p
        mask_p = pos < end
        pairs = tl.load(sorted_pairs_ptr + pos, mask=mask_p, other=0).to(tl.int64)
        tok = pairs // K
        slot = pairs % K
        w = tl.load(weights_ptr + tok * stride_w_t + slot * stride_w_k,
                    mask=mask_p, other=0.0).to(ACC_DTYPE)
        mask_pr = mask_p[:, None] & mask_r[None, :]
        mask_pf = mask_p[:, None] & mask_f[None, :]
        cols = expert * R + offs_r[None, :]
        sh_ptrs = shrink_ptr + tok[:, None] * stride_sh_t
        s_gate = tl.load(sh_ptrs + cols * stride_sh_c, mask=mask_pr, other=0.0).to(ACC_DTYPE)
        s_up = tl.load(sh_ptrs + (UP_OFFSET + cols) * stride_sh_c, mask=mask_pr,
                       other=0.0).to(ACC_DTYPE)
        b = tl.load(grad_z_ptr + tok[:, None] * stride_dz_t + cols * stride_dz_c, mask=mask_pr,
                    other=0.0).to(ACC_DTYPE)
        g = tl.load(gate_base_ptr + tok[:, None] * stride_gb_t + offs_f[None, :] * stride_gb_f,
                    mask=mask_pf, other=0.0).to(ACC_DTYPE)
        u = tl.load(up_base_ptr + tok[:, None] * stride_ub_t + offs_f[None, :] * stride_ub_f,
                    mask=mask_pf, other=0.0).to(ACC_DTYPE)
        d_h_c = tl.load(grad_h_c_ptr + tok[:, None] * stride_dhc_t
                        + offs_f[None, :] * stride_dhc_f, mask=mask_pf, other=0.0).to(ACC_DTYPE)
        g += tl.dot(s_gate, tl.trans(b_gate), input_precision="ieee")
        u += tl.dot(s_up, tl.trans(b_up), input_precision="ieee")
        q = d_h_c + tl.dot(b, a_down, input_precision="ieee")
        act_g, act_grad = _act_and_grad(g, ACTIVATION)
        h = act_g * u
        dh = w[:, None] * q
        dg = dh * u * act_grad
        du = dh * act_g
        acc_b_gate += tl.dot(tl.trans(dg), s_gate, input_precision="ieee")
        acc_b_up += tl.dot(tl.trans(du), s_up, input_precision="ieee")
        acc_a_down += tl.dot(tl.trans(w[:, None] * b), h, input_precision="ieee")

    tl.store(d_b_gate_ptr + expert * stride_dbg_e + offs_f[:, None] * stride_dbg_f
             + offs_r[None, :] * stride_dbg_r, acc_b_gate.to(d_b_gate_ptr.dtype.element_ty),
             mask=mask_fr)
    tl.store(d_b_up_ptr + expert * stride_dbu_e + offs_f[:, None] * stride_dbu_f
             + offs_r[None, :] * stride_dbu_r, acc_b_up.to(d_b_up_ptr.dtype.element_ty),
             mask=mask_fr)
    tl.store(d_a_down_ptr + expert * stride_dad_e + offs_r[:, None] * stride_dad_r
             + offs_f[None, :] * stride_dad_f, acc_a_down.to(d_a_down_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_f[None, :])
