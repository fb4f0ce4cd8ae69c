"""Tensor-core variant of the expert-mix token kernels (only @triton.jit code).

Same arguments and results as the gather kernels in _expert_ffn_kernels.py. Instead of
gathering each token's B^{e_k} rows and reducing over R on CUDA cores, every per-token
expand and reduction runs as `tl.dot` against all E experts' stacked matrices, with the
token's own expert block selected by a one-hot mask on the small operand:

  expand   g_k = G + onehot_k(shrink) [BLOCK_T, E·R] · B_stacked [E·R, BLOCK_F]
  reduce   a_d[t, e_k block] = (h_k [BLOCK_T, BLOCK_F] · A_d_stacked^T [BLOCK_F, E·R]) masked

B_stacked[c, f] = B[c // R, f, c % R] is read straight from the (E, F, R) tensors through
strides. The E·R columns are walked in chunks of BLOCK_C. The extra FLOPs are E× those of
the gather (2·T·K·E·R·F per matrix), spent on tensor cores while each B tile is loaded once
per token tile instead of once per token: the better trade while K·E·R is small against H.
Operands are cast to DOT_DTYPE (the inputs' fp16/bf16, else the accumulation dtype with
IEEE precision); accumulation is in ACC_DTYPE.
"""
import triton
import triton.language as tl

from ._activation_kernels import act as _act
from ._activation_kernels import act_and_grad as _act_and_grad
from ._expert_ffn_kernels import load_slot, load_tf, token_tile


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32 or DOT_DTYPE == tl.float64:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def _onehot_expand(small_ptr, col0, stride_s_t, stride_s_c, m_ptr, stride_m_e, stride_m_f,
                   stride_m_r, experts, offs_t, offs_f, mask_t, mask_f, R, NUM_COLS,
                   ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[t, f] = sum_r small[t, col0 + e_t·R + r] · M[e_t, f, r] as one-hot tl.dots."""
    acc = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
    for c0 in range(0, NUM_COLS, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < NUM_COLS
        own = mask_t[:, None] & col_ok[None, :] & ((cols[None, :] // R) == experts[:, None])
        a = tl.load(small_ptr + offs_t[:, None] * stride_s_t + (col0 + cols[None, :]) * stride_s_c,
                    mask=own, other=0.0)
        m = tl.load(m_ptr + (cols // R)[:, None] * stride_m_e + offs_f[None, :] * stride_m_f
                    + (cols % R)[:, None] * stride_m_r,
                    mask=col_ok[:, None] & mask_f[None, :], other=0.0)
        acc = _dot(a, m, acc, DOT_DTYPE)
    return acc


@triton.jit
def _onehot_reduce_add(x, scale, dst_ptr, col0, stride_d_t, stride_d_c, m_ptr, stride_m_e,
                       stride_m_f, stride_m_r, experts, offs_t, offs_f, mask_t, mask_f, R,
                       NUM_COLS, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst[t, col0 + e_t·R + r] += scale[t] · sum_f x[t, f] M[e_t, f, r] (this F tile's
    partial sum, added with atomics; only each token's own expert block is written)."""
    for c0 in range(0, NUM_COLS, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < NUM_COLS
        m = tl.load(m_ptr + (cols // R)[None, :] * stride_m_e + offs_f[:, None] * stride_m_f
                    + (cols % R)[None, :] * stride_m_r,
                    mask=mask_f[:, None] & col_ok[None, :], other=0.0)
        part = _dot(x, m, tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC_DTYPE), DOT_DTYPE)
        own = mask_t[:, None] & col_ok[None, :] & ((cols[None, :] // R) == experts[:, None])
        tl.atomic_add(dst_ptr + offs_t[:, None] * stride_d_t + (col0 + cols[None, :]) * stride_d_c,
                      part * scale[:, None], mask=own)


@triton.jit
def _gate_up(gate, up, shrink_ptr, stride_sh_t, stride_sh_c, b_gate_ptr, stride_bg_e, stride_bg_f,
             stride_bg_r, b_up_ptr, stride_bu_e, stride_bu_f, stride_bu_r, experts, offs_t, offs_f,
             mask_t, mask_f, R, NUM_COLS, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr):
    """g_k = G + B_g^{e_k} shrink_g and u_k = U + B_u^{e_k} shrink_u for one slot (up columns
    start at NUM_COLS = E·R in the shrink)."""
    g = gate + _onehot_expand(shrink_ptr, 0, stride_sh_t, stride_sh_c, b_gate_ptr, stride_bg_e,
                              stride_bg_f, stride_bg_r, experts, offs_t, offs_f, mask_t, mask_f,
                              R, NUM_COLS, ACC_DTYPE, DOT_DTYPE, BLOCK_T, BLOCK_F, BLOCK_C)
    u = up + _onehot_expand(shrink_ptr, NUM_COLS, stride_sh_t, stride_sh_c, b_up_ptr, stride_bu_e,
                            stride_bu_f, stride_bu_r, experts, offs_t, offs_f, mask_t, mask_f,
                            R, NUM_COLS, ACC_DTYPE, DOT_DTYPE, BLOCK_T, BLOCK_F, BLOCK_C)
    return g, u


@triton.jit
def _expert_mix_fwd_dot_kernel(
    gate_base_ptr, up_base_ptr, shrink_ptr, b_gate_ptr, b_up_ptr, a_down_ptr,
    indices_ptr, weights_ptr, h_c_ptr, z_ptr,
    T, F, K, R, UP_OFFSET,
    stride_gb_t, stride_gb_f, stride_ub_t, stride_ub_f, stride_sh_t, stride_sh_c,
    stride_bg_e, stride_bg_f, stride_bg_r, stride_bu_e, stride_bu_f, stride_bu_r,
    stride_ad_e, stride_ad_r, stride_ad_f, stride_idx_t, stride_idx_k, stride_w_t, stride_w_k,
    stride_hc_t, stride_hc_f, stride_z_t, stride_z_c,
    ACTIVATION: tl.constexpr, R_PAD: tl.constexpr, ACC_FP64: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """As _expert_mix_fwd_kernel (h_c written once; z += w_k A_d h_k with atomics), with
    one-hot tl.dots. UP_OFFSET = E·R is also the number of stacked columns per matrix."""
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    offs_t, offs_f, mask_t, mask_f, mask_tf = token_tile(T, F, BLOCK_T, BLOCK_F)
    gate = load_tf(gate_base_ptr, offs_t, offs_f, mask_tf, stride_gb_t, stride_gb_f, ACC_DTYPE)
    up = load_tf(up_base_ptr, offs_t, offs_f, mask_tf, stride_ub_t, stride_ub_f, ACC_DTYPE)
    h_c = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
    for k in range(K):
        experts, w = load_slot(indices_ptr, weights_ptr, k, offs_t, mask_t, stride_idx_t,
                               stride_idx_k, stride_w_t, stride_w_k, ACC_DTYPE)
        g, u = _gate_up(gate, up, shrink_ptr, stride_sh_t, stride_sh_c, b_gate_ptr, stride_bg_e,
                        stride_bg_f, stride_bg_r, b_up_ptr, stride_bu_e, stride_bu_f, stride_bu_r,
                        experts, offs_t, offs_f, mask_t, mask_f, R, UP_OFFSET, ACC_DTYPE, DOT_DTYPE,
                        BLOCK_T, BLOCK_F, BLOCK_C)
        h = tl.where(mask_tf, _act(g, ACTIVATION) * u, 0.0)
        h_c += w[:, None] * h
        # A_d (E, R, F) read as M[e, f, r]: a_d[t, e_t block] = sum_f h[t, f] A_d[e_t, r, f]
        _onehot_reduce_add(h, w, z_ptr, 0, stride_z_t, stride_z_c, a_down_ptr, stride_ad_e,
                           stride_ad_f, stride_ad_r, experts, offs_t, offs_f, mask_t, mask_f, R,
                           UP_OFFSET, ACC_DTYPE, DOT_DTYPE, BLOCK_T, BLOCK_C)
    tl.store(h_c_ptr + offs_t[:, None] * stride_hc_t + offs_f[None, :] * stride_hc_f,
             h_c.to(h_c_ptr.dtype.element_ty), mask=mask_tf)


@triton.jit
def _expert_mix_bwd_token_dot_kernel(
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
    DOT_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """As _expert_mix_bwd_token_kernel (same outputs and maths), with one-hot tl.dots:
    q = dh_c + A_d^T b is an expand of grad_z through A_d, d(shrink) a reduce through B."""
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    offs_t, offs_f, mask_t, mask_f, mask_tf = token_tile(T, F, BLOCK_T, BLOCK_F)
    gate = load_tf(gate_base_ptr, offs_t, offs_f, mask_tf, stride_gb_t, stride_gb_f, ACC_DTYPE)
    up = load_tf(up_base_ptr, offs_t, offs_f, mask_tf, stride_ub_t, stride_ub_f, ACC_DTYPE)
    d_h_c = load_tf(grad_h_c_ptr, offs_t, offs_f, mask_tf, stride_dhc_t, stride_dhc_f, ACC_DTYPE)
    d_gate = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
    d_up = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
    ones = tl.full((BLOCK_T,), 1.0, ACC_DTYPE)
    for k in range(K):
        experts, w = load_slot(indices_ptr, weights_ptr, k, offs_t, mask_t, stride_idx_t,
                               stride_idx_k, stride_w_t, stride_w_k, ACC_DTYPE)
        g, u = _gate_up(gate, up, shrink_ptr, stride_sh_t, stride_sh_c, b_gate_ptr, stride_bg_e,
                        stride_bg_f, stride_bg_r, b_up_ptr, stride_bu_e, stride_bu_f, stride_bu_r,
                        experts, offs_t, offs_f, mask_t, mask_f, R, UP_OFFSET, ACC_DTYPE, DOT_DTYPE,
                        BLOCK_T, BLOCK_F, BLOCK_C)
        # A_d (E, R, F) read as M[e, f, r]; b = grad_z[t, e_t block]
        q = d_h_c + _onehot_expand(grad_z_ptr, 0, stride_dz_t, stride_dz_c, a_down_ptr, stride_ad_e,
                                   stride_ad_f, stride_ad_r, experts, offs_t, offs_f, mask_t, mask_f,
                                   R, UP_OFFSET, ACC_DTYPE, DOT_DTYPE, BLOCK_T, BLOCK_F, BLOCK_C)
        act_g, act_grad = _act_and_grad(g, ACTIVATION)
        h = act_g * u
        tl.atomic_add(d_weights_ptr + offs_t * stride_dw_t + k * stride_dw_k,
                      tl.sum(tl.where(mask_tf, h * q, 0.0), axis=1), mask=mask_t)
        dh = w[:, None] * q
        dg = tl.where(mask_tf, dh * u * act_grad, 0.0)
        du = tl.where(mask_tf, dh * act_g, 0.0)
        d_gate += dg
        d_up += du
        _onehot_reduce_add(dg, ones, d_shrink_ptr, 0, stride_dsh_t, stride_dsh_c, b_gate_ptr,
                           stride_bg_e, stride_bg_f, stride_bg_r, experts, offs_t, offs_f, mask_t,
                           mask_f, R, UP_OFFSET, ACC_DTYPE, DOT_DTYPE, BLOCK_T, BLOCK_C)
        _onehot_reduce_add(du, ones, d_shrink_ptr, UP_OFFSET, stride_dsh_t, stride_dsh_c, b_up_ptr,
                           stride_bu_e, stride_bu_f, stride_bu_r, experts, offs_t, offs_f, mask_t,
                           mask_f, R, UP_OFFSET, ACC_DTYPE, DOT_DTYPE, BLOCK_T, BLOCK_C)
    tl.store(d_gate_base_ptr + offs_t[:, None] * stride_dgb_t + offs_f[None, :] * stride_dgb_f,
             d_gate.to(d_gate_base_ptr.dtype.element_ty), mask=mask_tf)
    tl.store(d_up_base_ptr + offs_t[:, None] * stride_dub_t + offs_f[None, :] * stride_dub_f,
             d_up.to(d_up_base_ptr.dtype.element_ty), mask=mask_tf)
