"""Triton kernels of the graph router (only @triton.jit code; launchers in graph_router.py).

Row layout shared by both kernels. A program owns a tile of `tokens_per_tile` tokens and
flattens their (token, node) pairs into BLOCK_M rows: row m holds node m % (E+1) (the E
experts, then the token node at index E) of local token m // (E+1). Rows past
tokens_per_tile·(E+1), or of tokens ≥ T, are padding and are masked out of every load,
mix and store. Per token the GCN layer is  Z^l = Â (N^{l-1} W_l^T),  N^l = act(Z^l): the
GEMM N W^T runs on the flattened rows (one tl.dot per (column, reduction) block of G), and
the node mix Â runs as one tl.dot with the block-diagonal BLOCK_M×BLOCK_M matrix
diag(Â, …, Â), gathered from Â with a same-token mask. Columns (G) are padded to
BLOCK_N / BLOCK_K blocks with masks.

Layer 1 arrives pre-reduced from torch: Z^1[t, i] = C1[i] + Â[i, E] · u[t], with
C1 = (Â[:, :E] P) W_1^T and u = t W_1^T, so it is elementwise here.

Node states of one tile live in a per-program scratch area of global memory (G can be
512: a tile's (E+1)·G states do not fit in registers); `tl.debug_barrier()` separates a
layer's writes from the next layer's reads. Programs are persistent: each loops over
tiles with stride num_programs, so scratch scales with the grid, not with T.

TOKEN_READOUT (the token-readout option): the logits read the expert rows' last states with
each token's own vector q_t (T, G) instead of the shared w_p, ℓ = N^L q_t; the backward then
writes d q_t per token (like du) in place of summing dw_p.

The backward's sums over tokens (dC1, dW, dw_p) go to per-program partial rows: a program
adds each tile's share to its own row (plain loads and stores; the barrier at the top of the
tile loop orders them), and the launcher sums the rows in a fixed order. No atomics, so the
result does not depend on the order programs run in.
"""
import triton
import triton.language as tl

from ._activation_kernels import act as _act
from ._activation_kernels import act_grad as _act_grad


@triton.jit
def _accumulate(ptr, value, mask):
    """*ptr += value on this program's own partial row (no other program writes it)."""
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _mix_matrix(adjacency_ptr, stride_adjacency_row, stride_adjacency_col, node, local_tok, row_ok,
                TRANSPOSE: tl.constexpr):
    """diag(Â, …, Â) over the tile's rows (BLOCK_M, BLOCK_M); diag(Âᵀ, …) if TRANSPOSE."""
    same = (local_tok[:, None] == local_tok[None, :]) & row_ok[:, None] & row_ok[None, :]
    if TRANSPOSE:
        ptrs = adjacency_ptr + node[None, :] * stride_adjacency_row + node[:, None] * stride_adjacency_col
    else:
        ptrs = adjacency_ptr + node[:, None] * stride_adjacency_row + node[None, :] * stride_adjacency_col
    return tl.load(ptrs, mask=same, other=0.0)


@triton.jit
def _layer1_preact(c1_ptr, stride_c1_node, stride_c1_g, token_proj_ptr, stride_token_proj_t, stride_token_proj_g,
                   node, tok, row_ok, adj_tok, offs_n, n_ok):
    """Z^1[rows, offs_n] = C1[node] + Â[node, E] · u[tok]  (BLOCK_M, BLOCK_N)."""
    mask = row_ok[:, None] & n_ok[None, :]
    c1 = tl.load(c1_ptr + node[:, None] * stride_c1_node + offs_n[None, :] * stride_c1_g,
                 mask=mask, other=0.0)
    u = tl.load(token_proj_ptr + tok[:, None] * stride_token_proj_t + offs_n[None, :] * stride_token_proj_g,
                mask=mask, other=0.0)
    return c1 + adj_tok[:, None] * u


@triton.jit
def _act_rows_times_wt(z_ptr, stride_z_row, gcn_weight_ptr, stride_gcn_weight_out, stride_gcn_weight_in, width,
                       offs_m, offs_n, n_ok, ACTIVATION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k act(Z[rows, k]) W[offs_n, k]  (BLOCK_M, BLOCK_N), Z read from scratch."""
    dtype = z_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=dtype)
    for k0 in range(0, width, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < width
        z = tl.load(z_ptr + offs_m[:, None] * stride_z_row + offs_k[None, :],
                    mask=k_ok[None, :], other=0.0)
        w_t = tl.load(gcn_weight_ptr + offs_k[:, None] * stride_gcn_weight_in + offs_n[None, :] * stride_gcn_weight_out,
                      mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(dtype)
        acc = tl.dot(_act(z, ACTIVATION), w_t, acc, input_precision="ieee")
    return acc


@triton.jit
def _token_readout(readout_ptr, stride_readout_t, stride_readout_g, tok, row_ok, offs_n, n_ok, dtype):
    """q[tok, offs_n] for every row (BLOCK_M, BLOCK_N): each token's readout vector, on its rows."""
    return tl.load(readout_ptr + tok[:, None] * stride_readout_t + offs_n[None, :] * stride_readout_g,
                   mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(dtype)


# Longer than 80 lines on purpose: the persistent tile loop and its layer loop read and
# write the program's scratch between tl.debug_barrier() calls, which must stay in the
# kernel's own control flow to order them; a split would pass ~20 pointers and strides
# per helper call. The signature, one stride per tensor dimension, is a fifth of it.
# tokens_per_tile is 1 from E = 32 on: specialised to a constant, it made ptxas spill.
@triton.jit(do_not_specialize=["tokens_per_tile"])
def _graph_router_fwd_kernel(
    c1_ptr, token_proj_ptr, adjacency_ptr, gcn_weight_ptr, score_weight_ptr, readout_ptr, logits_ptr,
    probs_ptr, scratch_ptr,
    num_tokens, num_experts, width, tokens_per_tile, num_tiles,
    stride_c1_node, stride_c1_g, stride_token_proj_t, stride_token_proj_g,
    stride_adjacency_row, stride_adjacency_col,
    stride_gcn_weight_layer, stride_gcn_weight_out, stride_gcn_weight_in, stride_score_weight_g,
    stride_readout_t, stride_readout_g,
    stride_logits_t, stride_logits_e, stride_probs_t, stride_probs_e,
    stride_scratch_prog, stride_scratch_slot, stride_scratch_row,
    NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TOKEN_READOUT: tl.constexpr,
):
    """logits = N^L[:, :E] w_p (N^L[:, :E] q_t with TOKEN_READOUT) and probs = softmax(logits)
    for every token.

    Scratch per program: 2 slots (ping-pong) × BLOCK_M × G holding the pre-activations Z.
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    dtype = c1_ptr.dtype.element_ty
    num_nodes = num_experts + 1
    offs_m = tl.arange(0, BLOCK_M)
    local_tok = offs_m // num_nodes
    node = offs_m % num_nodes
    in_tile = local_tok < tokens_per_tile
    is_expert = node < num_experts
    adj_tok = tl.load(adjacency_ptr + node * stride_adjacency_row + num_experts * stride_adjacency_col,
                      mask=in_tile, other=0.0)
    scratch = scratch_ptr + pid * stride_scratch_prog

    for tile in range(pid, num_tiles, num_programs):
        tok = (tile * tokens_per_tile + local_tok).to(tl.int64)
        row_ok = in_tile & (tok < num_tokens)
        out_ok = row_ok & is_expert
        logit = tl.zeros((BLOCK_M,), dtype=dtype)
        tl.debug_barrier()  # the previous tile is done with the scratch

        # Layer 1: elementwise from C1 and u.
        for n0 in range(0, width, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < width
            z = _layer1_preact(c1_ptr, stride_c1_node, stride_c1_g, token_proj_ptr,
                               stride_token_proj_t,
                               stride_token_proj_g, node, tok, row_ok, adj_tok, offs_n, n_ok)
            if NUM_LAYERS == 1 and not TOKEN_READOUT:
                score = tl.load(score_weight_ptr + offs_n * stride_score_weight_g, mask=n_ok,
                                other=0.0).to(dtype)
                logit += tl.sum(_act(z, ACTIVATION) * score[None, :], axis=1)
            else:
                tl.store(scratch + offs_m[:, None] * stride_scratch_row + offs_n[None, :],
                         z, mask=n_ok[None, :])
        tl.debug_barrier()

        # Layers 2..L: Z^l = diag(Â) (act(Z^{l-1}) W_l^T).
        for layer in tl.static_range(1, NUM_LAYERS):
            src = scratch + ((layer - 1) % 2) * stride_scratch_slot
            dst = scratch + (layer % 2) * stride_scratch_slot
            for n0 in range(0, width, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < width
                acc = _act_rows_times_wt(src, stride_scratch_row, gcn_weight_ptr + layer * stride_gcn_weight_layer,
                                         stride_gcn_weight_out, stride_gcn_weight_in, width, offs_m,
                                         offs_n, n_ok,
                                         ACTIVATION, BLOCK_M, BLOCK_N, BLOCK_K)
                mix = _mix_matrix(adjacency_ptr, stride_adjacency_row, stride_adjacency_col, node,
                                  local_tok,
                                  row_ok, False)
                z = tl.dot(mix, acc, input_precision="ieee")
                if layer == NUM_LAYERS - 1 and not TOKEN_READOUT:
                    score = tl.load(score_weight_ptr + offs_n * stride_score_weight_g, mask=n_ok,
                                    other=0.0).to(dtype)
                    logit += tl.sum(_act(z, ACTIVATION) * score[None, :], axis=1)
                else:
                    tl.store(dst + offs_m[:, None] * stride_scratch_row + offs_n[None, :],
                             z, mask=n_ok[None, :])
            tl.debug_barrier()

        # Token readout: ℓ = N^L q_t from Z^L in scratch, in its own loop (fewer live registers
        # than inside the layer loop's tl.dot).
        if TOKEN_READOUT:
            z_top = scratch + ((NUM_LAYERS - 1) % 2) * stride_scratch_slot
            for n0 in range(0, width, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < width
                z = tl.load(z_top + offs_m[:, None] * stride_scratch_row + offs_n[None, :],
                            mask=n_ok[None, :], other=0.0)
                logit += tl.sum(_act(z, ACTIVATION) * _token_readout(
                    readout_ptr, stride_readout_t, stride_readout_g, tok, row_ok, offs_n, n_ok, dtype), axis=1)

        # Softmax over each token's expert rows (same-token mask, no reshape needed).
        same = (local_tok[:, None] == local_tok[None, :]) & out_ok[None, :]
        logit = tl.where(out_ok, logit, 0.0)
        row_max = tl.max(tl.where(same, logit[None, :], float("-inf")), axis=1)
        num = tl.exp(logit - tl.where(out_ok, row_max, 0.0))
        den = tl.sum(tl.where(same, num[None, :], 0.0), axis=1)
        prob = num / tl.where(out_ok, den, 1.0)
        tl.store(logits_ptr + tok * stride_logits_t + node * stride_logits_e, logit, mask=out_ok)
        tl.store(probs_ptr + tok * stride_probs_t + node * stride_probs_e, prob, mask=out_ok)


@triton.jit
def _emit_layer_grad(dz, LAYER: tl.constexpr, offs_n, n_ok, offs_m, node, local_tok, row_ok,
                     adj_tok, tile, tokens_per_tile, num_tokens, num_nodes,
                     adjacency_ptr, stride_adjacency_row, stride_adjacency_col,
                     d_slot_ptr, stride_scratch_row,
                     d_c1_ptr, stride_d_c1_node, stride_d_c1_g,
                     d_token_proj_ptr, stride_d_token_proj_t, stride_d_token_proj_g):
    """Consume dZ^{LAYER+1}[:, offs_n] (0-based LAYER).

    LAYER ≥ 1: store D = diag(Âᵀ) dZ to the D slot (the next layer down reads all of it).
    LAYER = 0: dC1[i] += sum over the tile's rows of node i (this program's partial row);
               du[t] = sum over token t's rows of Â[node, E] dZ (each token in one tile).
    """
    if LAYER >= 1:
        mix_t = _mix_matrix(adjacency_ptr, stride_adjacency_row, stride_adjacency_col, node,
                            local_tok, row_ok,
                            True)
        d = tl.dot(mix_t, dz, input_precision="ieee")
        tl.store(d_slot_ptr + offs_m[:, None] * stride_scratch_row + offs_n[None, :], d,
                 mask=n_ok[None, :])
    else:
        sel_node = (node[None, :] == offs_m[:, None]) & row_ok[None, :]
        d_c1 = tl.dot(sel_node.to(dz.dtype), dz, input_precision="ieee")
        _accumulate(d_c1_ptr + offs_m[:, None] * stride_d_c1_node + offs_n[None, :] * stride_d_c1_g,
                    d_c1, (offs_m < num_nodes)[:, None] & n_ok[None, :])
        sel_tok = tl.where((local_tok[None, :] == offs_m[:, None]) & row_ok[None, :],
                           adj_tok[None, :], 0.0)
        d_u = tl.dot(sel_tok, dz, input_precision="ieee")
        out_tok = (tile * tokens_per_tile + offs_m).to(tl.int64)
        tok_ok = (offs_m < tokens_per_tile) & (out_tok < num_tokens)
        tl.store(d_token_proj_ptr + out_tok[:, None] * stride_d_token_proj_t
                 + offs_n[None, :] * stride_d_token_proj_g, d_u,
                 mask=tok_ok[:, None] & n_ok[None, :])


# Longer than 80 lines on purpose: the persistent tile loop and its layer loop read and
# write the program's scratch between tl.debug_barrier() calls, which must stay in the
# kernel's own control flow to order them; a split would pass ~20 pointers and strides
# per helper call. The signature, one stride per tensor dimension, is a fifth of it.
# tokens_per_tile is 1 from E = 32 on: specialised to a constant, it made ptxas spill.
@triton.jit(do_not_specialize=["tokens_per_tile"])
def _graph_router_bwd_kernel(
    grad_logits_ptr, grad_probs_ptr, probs_ptr, c1_ptr, token_proj_ptr, adjacency_ptr,
    gcn_weight_ptr, score_weight_ptr, readout_ptr, d_c1_ptr, d_token_proj_ptr, d_gcn_weight_ptr,
    d_score_weight_ptr, d_readout_ptr, scratch_ptr,
    num_tokens, num_experts, width, tokens_per_tile, num_tiles,
    stride_grad_logits_t, stride_grad_logits_e, stride_grad_probs_t, stride_grad_probs_e,
    stride_probs_t, stride_probs_e, stride_c1_node, stride_c1_g,
    stride_token_proj_t, stride_token_proj_g, stride_adjacency_row, stride_adjacency_col,
    stride_gcn_weight_layer, stride_gcn_weight_out, stride_gcn_weight_in, stride_score_weight_g,
    stride_readout_t, stride_readout_g,
    stride_d_c1_prog, stride_d_c1_node, stride_d_c1_g,
    stride_d_token_proj_t, stride_d_token_proj_g,
    stride_d_gcn_weight_prog, stride_d_gcn_weight_layer, stride_d_gcn_weight_out,
    stride_d_gcn_weight_in,
    stride_d_score_weight_prog, stride_d_score_weight_g,
    stride_d_readout_t, stride_d_readout_g,
    stride_scratch_prog, stride_scratch_slot, stride_scratch_row,
    NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TOKEN_READOUT: tl.constexpr,
):
    """dC1, du, dW_2..dW_L, dw_p from d logits and d probs (maths: graph_router.py, `_autograd_backward`);
    with TOKEN_READOUT d q_t (every token's row written) in place of dw_p.

    Scratch per program: slots 0..L-1 hold the recomputed Z^1..Z^L of the tile, slots L and
    L+1 the ping-pong D^l = diag(Âᵀ) dZ^l. dC1, dW and dw_p are sums over all tokens: each
    program accumulates into its own zero-initialised partial row (leading dim = program).
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    dtype = c1_ptr.dtype.element_ty
    num_nodes = num_experts + 1
    offs_m = tl.arange(0, BLOCK_M)
    local_tok = offs_m // num_nodes
    node = offs_m % num_nodes
    in_tile = local_tok < tokens_per_tile
    is_expert = node < num_experts
    adj_tok = tl.load(adjacency_ptr + node * stride_adjacency_row + num_experts * stride_adjacency_col,
                      mask=in_tile, other=0.0)
    scratch = scratch_ptr + pid * stride_scratch_prog
    d_c1_ptr += pid * stride_d_c1_prog
    d_gcn_weight_ptr += pid * stride_d_gcn_weight_prog
    d_score_weight_ptr += pid * stride_d_score_weight_prog

    for tile in range(pid, num_tiles, num_programs):
        tok = (tile * tokens_per_tile + local_tok).to(tl.int64)
        row_ok = in_tile & (tok < num_tokens)
        out_ok = row_ok & is_expert
        tl.debug_barrier()  # also orders the partial rows' updates of the previous tile

        # Recompute Z^1..Z^L of the tile into scratch slots 0..L-1.
        for n0 in range(0, width, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < width
            z = _layer1_preact(c1_ptr, stride_c1_node, stride_c1_g, token_proj_ptr,
                               stride_token_proj_t,
                               stride_token_proj_g, node, tok, row_ok, adj_tok, offs_n, n_ok)
            tl.store(scratch + offs_m[:, None] * stride_scratch_row + offs_n[None, :], z,
                     mask=n_ok[None, :])
        tl.debug_barrier()
        for layer in tl.static_range(1, NUM_LAYERS):
            src = scratch + (layer - 1) * stride_scratch_slot
            dst = scratch + layer * stride_scratch_slot
            for n0 in range(0, width, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < width
                acc = _act_rows_times_wt(src, stride_scratch_row, gcn_weight_ptr + layer * stride_gcn_weight_layer,
                                         stride_gcn_weight_out, stride_gcn_weight_in, width, offs_m,
                                         offs_n, n_ok,
                                         ACTIVATION, BLOCK_M, BLOCK_N, BLOCK_K)
                mix = _mix_matrix(adjacency_ptr, stride_adjacency_row, stride_adjacency_col, node,
                                  local_tok,
                                  row_ok, False)
                z = tl.dot(mix, acc, input_precision="ieee")
                tl.store(dst + offs_m[:, None] * stride_scratch_row + offs_n[None, :], z,
                         mask=n_ok[None, :])
            tl.debug_barrier()

        # d logits: the given one plus the softmax backward of d probs.
        same = (local_tok[:, None] == local_tok[None, :]) & out_ok[None, :]
        g_logit = tl.load(grad_logits_ptr + tok * stride_grad_logits_t + node * stride_grad_logits_e, mask=out_ok,
                          other=0.0).to(dtype)
        g_prob = tl.load(grad_probs_ptr + tok * stride_grad_probs_t + node * stride_grad_probs_e, mask=out_ok,
                         other=0.0).to(dtype)
        prob = tl.load(probs_ptr + tok * stride_probs_t + node * stride_probs_e, mask=out_ok,
                       other=0.0).to(dtype)
        dot_gp = tl.sum(tl.where(same, (g_prob * prob)[None, :], 0.0), axis=1)
        d_logit = tl.where(out_ok, g_logit + prob * (g_prob - dot_gp), 0.0)

        # Top layer: dw_p and dZ^L = (d_logit ⊗ w_p) ⊙ act'(Z^L) on the expert rows.
        z_top = scratch + (NUM_LAYERS - 1) * stride_scratch_slot
        if TOKEN_READOUT:
            # d q_t = sum over token t's expert rows of d_logit · N^L (d_logit is 0 off them)
            sel_tok = ((local_tok[None, :] == offs_m[:, None]) & out_ok[None, :]).to(dtype)
            out_tok = (tile * tokens_per_tile + offs_m).to(tl.int64)
            tok_ok = (offs_m < tokens_per_tile) & (out_tok < num_tokens)
            for n0 in range(0, width, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < width
                z = tl.load(z_top + offs_m[:, None] * stride_scratch_row + offs_n[None, :],
                            mask=n_ok[None, :], other=0.0)
                d_q = tl.dot(sel_tok, d_logit[:, None] * _act(z, ACTIVATION), input_precision="ieee")
                tl.store(d_readout_ptr + out_tok[:, None] * stride_d_readout_t + offs_n[None, :] * stride_d_readout_g,
                         d_q, mask=tok_ok[:, None] & n_ok[None, :])
        for n0 in range(0, width, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < width
            z = tl.load(z_top + offs_m[:, None] * stride_scratch_row + offs_n[None, :],
                        mask=n_ok[None, :], other=0.0)
            if TOKEN_READOUT:  # (d q_t is written by its own loop below: fewer live registers here)
                dz = d_logit[:, None] * _token_readout(readout_ptr, stride_readout_t, stride_readout_g, tok, row_ok,
                                                       offs_n, n_ok, dtype) * _act_grad(z, ACTIVATION)
            else:
                _accumulate(d_score_weight_ptr + offs_n * stride_d_score_weight_g,
                            tl.sum(d_logit[:, None] * _act(z, ACTIVATION), axis=0), n_ok)
                score = tl.load(score_weight_ptr + offs_n * stride_score_weight_g, mask=n_ok, other=0.0).to(dtype)
                dz = d_logit[:, None] * score[None, :] * _act_grad(z, ACTIVATION)
            _emit_layer_grad(dz, NUM_LAYERS - 1, offs_n, n_ok, offs_m, node, local_tok, row_ok,
                             adj_tok, tile, tokens_per_tile, num_tokens, num_nodes,
                             adjacency_ptr, stride_adjacency_row, stride_adjacency_col,
                             scratch + (NUM_LAYERS + (NUM_LAYERS - 1) % 2) * stride_scratch_slot,
                             stride_scratch_row,
                             d_c1_ptr, stride_d_c1_node, stride_d_c1_g,
                             d_token_proj_ptr, stride_d_token_proj_t, stride_d_token_proj_g)
        tl.debug_barrier()

        # Layers L..2: dW_l += D^lᵀ N^{l-1}, dZ^{l-1} = (D^l W_l) ⊙ act'(Z^{l-1}).
        for j in tl.static_range(NUM_LAYERS - 1):
            layer = NUM_LAYERS - 1 - j  # 0-based index of W_l; D^l is in slot L + layer % 2
            d_src = scratch + (NUM_LAYERS + layer % 2) * stride_scratch_slot
            z_prev_ptr = scratch + (layer - 1) * stride_scratch_slot
            for k0 in range(0, width, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < width
                z_prev = tl.load(z_prev_ptr + offs_m[:, None] * stride_scratch_row + offs_k[None, :],
                                 mask=k_ok[None, :], other=0.0)
                h_prev = _act(z_prev, ACTIVATION)
                acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=dtype)
                for n0 in range(0, width, BLOCK_N):
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    n_ok = offs_n < width
                    d = tl.load(d_src + offs_m[:, None] * stride_scratch_row + offs_n[None, :],
                                mask=n_ok[None, :], other=0.0)
                    w = tl.load(gcn_weight_ptr + layer * stride_gcn_weight_layer
                                + offs_n[:, None] * stride_gcn_weight_out
                                + offs_k[None, :] * stride_gcn_weight_in,
                                mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(dtype)
                    acc = tl.dot(d, w, acc, input_precision="ieee")
                    d_w = tl.dot(tl.trans(d), h_prev, input_precision="ieee")
                    _accumulate(d_gcn_weight_ptr + layer * stride_d_gcn_weight_layer
                                + offs_n[:, None] * stride_d_gcn_weight_out
                                + offs_k[None, :] * stride_d_gcn_weight_in, d_w,
                                n_ok[:, None] & k_ok[None, :])
                dz = acc * _act_grad(z_prev, ACTIVATION)
                _emit_layer_grad(dz, layer - 1, offs_k, k_ok, offs_m, node, local_tok, row_ok,
                                 adj_tok, tile, tokens_per_tile, num_tokens, num_nodes,
                                 adjacency_ptr, stride_adjacency_row, stride_adjacency_col,
                                 scratch + (NUM_LAYERS + (layer - 1) % 2) * stride_scratch_slot,
                                 stride_scratch_row,
                                 d_c1_ptr, stride_d_c1_node, stride_d_c1_g,
                                 d_token_proj_ptr, stride_d_token_proj_t, stride_d_token_proj_g)
            tl.debug_barrier()
