"""Tensor-core variant of the expert-mix token kernels (only @triton.jit code).

Same arguments and results as the gather kernels in _expert_mix_kernels.py. Instead of
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
IEEE precision); accumulation is in ACC_DTYPE. As in the gather kernels, a program walks the
F tiles of its split and keeps the reductions over F per slot in registers (no atomics); a
reduce's [BLOCK_T, BLOCK_C] columns fold into the token's own R columns by a reshape, which
needs R to be a power of two (the launcher picks "gather" otherwise).
"""
import triton
import triton.language as tl

from ._activation_kernels import act as _act
from ._activation_kernels import act_and_grad as _act_and_grad
from ._expert_mix_kernels import add_to_slot, f_tile, load_slot, load_tf, store_slots, token_tile
from ._expert_mix_kernels import dot_acc as _dot


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
def _onehot_reduce(x, m_ptr, stride_m_e, stride_m_f, stride_m_r, experts, offs_f, mask_t,
                   mask_f, R, NUM_COLS, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, R_PAD: tl.constexpr):
    """(BLOCK_T, R_PAD): out[t, r] = sum_f x[t, f] M[e_t, f, r] over this F tile, as one-hot
    tl.dots against all experts' columns folded onto each token's own block (R = R_PAD)."""
    out = tl.zeros((BLOCK_T, R_PAD), dtype=ACC_DTYPE)
    for c0 in range(0, NUM_COLS, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < NUM_COLS
        m = tl.load(m_ptr + (cols // R)[None, :] * stride_m_e + offs_f[:, None] * stride_m_f
                    + (cols % R)[None, :] * stride_m_r,
                    mask=mask_f[:, None] & col_ok[None, :], other=0.0)
        part = _dot(x, m, tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC_DTYPE), DOT_DTYPE)
        own = mask_t[:, None] & col_ok[None, :] & ((cols[None, :] // R) == experts[:, None])
        # column c0 + j·R + r holds rank r: fold the BLOCK_C columns onto R_PAD of them
        out += tl.sum(tl.reshape(tl.where(own, part, 0.0), (BLOCK_T, BLOCK_C // R_PAD, R_PAD)),
                      axis=1)
    return out


@triton.jit
def _gate_up(gate, up, shrink_ptr, stride_shrink_t, stride_shrink_c,
             lora_b_gate_ptr, stride_lora_b_gate_e, stride_lora_b_gate_f, stride_lora_b_gate_r,
             lora_b_up_ptr, stride_lora_b_up_e, stride_lora_b_up_f, stride_lora_b_up_r,
             experts, offs_t, offs_f, mask_t, mask_f, R, NUM_COLS,
             ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr):
    """g_k = G + B_g^{e_k} shrink_g and u_k = U + B_u^{e_k} shrink_u for one slot (up columns
    start at NUM_COLS = E·R in the shrink)."""
    g = gate + _onehot_expand(shrink_ptr, 0, stride_shrink_t, stride_shrink_c,
                              lora_b_gate_ptr, stride_lora_b_gate_e, stride_lora_b_gate_f,
                              stride_lora_b_gate_r, experts, offs_t, offs_f, mask_t, mask_f,
                              R, NUM_COLS, ACC_DTYPE, DOT_DTYPE, BLOCK_T, BLOCK_F, BLOCK_C)
    u = up + _onehot_expand(shrink_ptr, NUM_COLS, stride_shrink_t, stride_shrink_c,
                            lora_b_up_ptr, stride_lora_b_up_e, stride_lora_b_up_f,
                            stride_lora_b_up_r, experts, offs_t, offs_f, mask_t, mask_f,
                            R, NUM_COLS, ACC_DTYPE, DOT_DTYPE, BLOCK_T, BLOCK_F, BLOCK_C)
    return g, u


@triton.jit
def _expert_mix_fwd_dot_kernel(
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
    K_PAD: tl.constexpr, ACC_FP64: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """As _expert_mix_fwd_kernel (same arguments and outputs), with one-hot tl.dots.
    UP_OFFSET = E·R is also the number of stacked columns per matrix."""
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    split = tl.program_id(1)
    offs_t, mask_t = token_tile(T, BLOCK_T)
    a_d_acc = tl.zeros((BLOCK_T, K_PAD, R_PAD), dtype=ACC_DTYPE)
    for f0 in range(split * BLOCK_F, F, tl.num_programs(1) * BLOCK_F):
        offs_f, mask_f = f_tile(f0, F, BLOCK_F)
        mask_tf = mask_t[:, None] & mask_f[None, :]
        gate = load_tf(gate_base_ptr, offs_t, offs_f, mask_tf, stride_gate_base_t,
                       stride_gate_base_f, ACC_DTYPE)
        up = load_tf(up_base_ptr, offs_t, offs_f, mask_tf, stride_up_base_t, stride_up_base_f,
                     ACC_DTYPE)
        h_c = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC_DTYPE)
        for k in tl.static_range(K):  # unrolled: fewer spills than the loop (compile gate)
            experts, w = load_slot(indices_ptr, weights_ptr, k, offs_t, mask_t, stride_indices_t,
                                   stride_indices_k, stride_weights_t, stride_weights_k, ACC_DTYPE)
            g, u = _gate_up(gate, up, shrink_ptr, stride_shrink_t, stride_shrink_c, lora_b_gate_ptr,
                            stride_lora_b_gate_e, stride_lora_b_gate_f, stride_lora_b_gate_r,
                            lora_b_up_ptr, stride_lora_b_up_e,
                            stride_lora_b_up_f, stride_lora_b_up_r, experts, offs_t, offs_f, mask_t,
                            mask_f, R,
                            UP_OFFSET, ACC_DTYPE, DOT_DTYPE, BLOCK_T, BLOCK_F, BLOCK_C)
            h = tl.where(mask_tf, _act(g, ACTIVATION) * u, 0.0)
            h_c += w[:, None] * h
            # A_d (E, R, F) read as M[e, f, r]: a_d[t] = sum_f h[t, f] A_d[e_t, :, f]
            a_d = _onehot_reduce(h, lora_a_down_ptr, stride_lora_a_down_e, stride_lora_a_down_f,
                                 stride_lora_a_down_r, experts,
                                 offs_f, mask_t, mask_f, R, UP_OFFSET, ACC_DTYPE, DOT_DTYPE,
                                 BLOCK_T, BLOCK_C, R_PAD)
            a_d_acc = add_to_slot(a_d_acc, k, w[:, None] * a_d, K_PAD)
        tl.store(h_c_ptr + offs_t[:, None] * stride_h_c_t + offs_f[None, :] * stride_h_c_f,
                 h_c.to(h_c_ptr.dtype.element_ty), mask=mask_tf)
    store_slots(slot_a_d_ptr, a_d_acc, T, K, R, K_PAD, R_PAD, BLOCK_T)


@triton.jit
def _expert_mix_bwd_token_dot_kernel(
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
    K_PAD: tl.constexpr, ACC_FP64: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """As _expert_mix_bwd_token_kernel (same outputs and maths), with one-hot tl.dots:
    q = dh_c + A_d^T b is an expand of grad_z through A_d, d(shrink) a reduce through B."""
    ACC_DTYPE = tl.float64 if ACC_FP64 else tl.float32
    split = tl.program_id(1)
    offs_t, mask_t = token_tile(T, BLOCK_T)
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
        for k in range(K):  # not unrolled: unrolled, K 8 spilled on sm_80 (compile gate)
            experts, w = load_slot(indices_ptr, weights_ptr, k, offs_t, mask_t, stride_indices_t,
                                   stride_indices_k, stride_weights_t, stride_weights_k, ACC_DTYPE)
            g, u = _gate_up(gate, up, shrink_ptr, stride_shrink_t, stride_shrink_c, lora_b_gate_ptr,
                            stride_lora_b_gate_e, stride_lora_b_gate_f, stride_lora_b_gate_r,
                            lora_b_up_ptr, stride_lora_b_up_e,
                            stride_lora_b_up_f, stride_lora_b_up_r, experts, offs_t, offs_f, mask_t,
                            mask_f, R,
                            UP_OFFSET, ACC_DTYPE, DOT_DTYPE, BLOCK_T, BLOCK_F, BLOCK_C)
            # A_d (E, R, F) read as M[e, f, r]; b = grad_z[t, e_t block]
            q = d_h_c + _onehot_expand(grad_z_ptr, 0, stride_grad_z_t, stride_grad_z_c, lora_a_down_ptr,
                                       stride_lora_a_down_e, stride_lora_a_down_f,
                                       stride_lora_a_down_r, experts, offs_t,
                                       offs_f, mask_t, mask_f, R, UP_OFFSET, ACC_DTYPE, DOT_DTYPE,
                                       BLOCK_T, BLOCK_F, BLOCK_C)
            act_g, act_grad = _act_and_grad(g, ACTIVATION)
            dw = tl.sum(tl.where(mask_tf, act_g * u * q, 0.0), axis=1)
            dw_acc = add_to_slot(dw_acc, k, dw[:, None], K_PAD)
            dh = w[:, None] * q
            dg = tl.where(mask_tf, dh * u * act_grad, 0.0)
            du = tl.where(mask_tf, dh * act_g, 0.0)
            d_gate += dg
            d_up += du
            dsg = _onehot_reduce(dg, lora_b_gate_ptr, stride_lora_b_gate_e, stride_lora_b_gate_f,
                                 stride_lora_b_gate_r, experts,
                                 offs_f, mask_t, mask_f, R, UP_OFFSET, ACC_DTYPE, DOT_DTYPE,
                                 BLOCK_T, BLOCK_C, R_PAD)
            dsg_acc = add_to_slot(dsg_acc, k, dsg, K_PAD)
            dsu = _onehot_reduce(du, lora_b_up_ptr, stride_lora_b_up_e, stride_lora_b_up_f,
                                 stride_lora_b_up_r, experts,
                                 offs_f, mask_t, mask_f, R, UP_OFFSET, ACC_DTYPE, DOT_DTYPE,
                                 BLOCK_T, BLOCK_C, R_PAD)
            dsu_acc = add_to_slot(dsu_acc, k, dsu, K_PAD)
        tl.store(d_gate_base_ptr + offs_t[:, None] * stride_d_gate_base_t + offs_f[None, :] * stride_d_gate_base_f,
                 d_gate.to(d_gate_base_ptr.dtype.element_ty), mask=mask_tf)
        tl.store(d_up_base_ptr + offs_t[:, None] * stride_d_up_base_t + offs_f[None, :] * stride_d_up_base_f,
                 d_up.to(d_up_base_ptr.dtype.element_ty), mask=mask_tf)
    store_slots(slot_d_weights_ptr, dw_acc, T, K, 1, K_PAD, 1, BLOCK_T)
    store_slots(slot_d_shrink_gate_ptr, dsg_acc, T, K, R, K_PAD, R_PAD, BLOCK_T)
    store_slots(slot_d_shrink_up_ptr, dsu_acc, T, K, R, K_PAD, R_PAD, BLOCK_T)
