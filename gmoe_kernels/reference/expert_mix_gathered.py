"""The expert mix for a few tokens (decoding): each token's K experts' LoRA factors gathered,
batched matmuls, no routing plan.

Same signature and results as `expert_mix.expert_mix` (the maths of its module docstring):

  g_k = G[t] + s B_g^{e_k} (A_g^{e_k} x_t),  u_k likewise,  h_k = act(g_k) * u_k
  h_c[t] = sum_k w_k h_k,   z[t, e_k] += w_k A_d^{e_k} h_k

For one token the routing plan (a sort, counts, offsets, one host read of the offsets) and the
per-expert loop cost more than the experts' arithmetic. Here the A's, B's and A_d of the chosen
experts are gathered per (token, slot), e.g. (T·K, F, R), and applied with batched matmuls
(row vector times matrix, the orientation ATen's CPU batched GEMM runs fastest): no host
synchronisation and static shapes, so it compiles whole (torch.compile, CUDA graphs). The
gathered copies cost T·K·(2·H + 3·F)·R elements, which is why it pays only below a measured
number of tokens (`gmoe_kernels.small_batch`).

Differentiable by autograd (gathers, matmuls and elementwise ops); the dispatch uses it where
no gradient is recorded, so the training step keeps the plan path and its memory profile.
"""
from __future__ import annotations

import torch

from ..activations import act, compute_dtype


def _slot_shrink(x_slots, lora_a, flat_indices):
    """(T·K, 1, R): A^{e_k} x_t for each token's K experts, reading only those K experts' A
    (the shrink over all E experts would read E/K times the bytes; decoding is bound by them)."""
    return torch.bmm(x_slots, _gather(lora_a, flat_indices).transpose(1, 2))


def _gather(weight, flat_indices):
    """(T·K, …): expert e_k's matrix for every (token, slot); index_select copies whole
    contiguous matrices, several times faster on a CPU than advanced indexing."""
    return weight.index_select(0, flat_indices)


def _slot_expand(base, lora_b, shrink, flat_indices, top_k, scaling):
    """(T·K, 1, F): base[t] + s B^{e_k} shrink_k for every (token, slot), as row vectors:
    (1, R) x (R, F) products, the orientation ATen's CPU batched GEMM runs fastest."""
    num_tokens, size_f = base.shape
    per_slot = base[:, None, :].expand(num_tokens, top_k, size_f).reshape(-1, 1, size_f)
    return torch.baddbmm(per_slot, shrink, _gather(lora_b, flat_indices).transpose(1, 2), alpha=scaling)


def expert_mix_gathered(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                        lora_a_down, indices, weights, scaling: float, activation: str):
    """h_c (T, F) and z (T, E·R) in x's dtype; shapes as `functional.expert_mix`. Sums in fp32
    (fp64 for fp64 x)."""
    compute = compute_dtype(x)
    num_experts, rank, _ = lora_a_gate.shape
    num_tokens, top_k = indices.shape
    flat = indices.reshape(-1)
    hidden = x.shape[1]
    x_slots = x.to(compute)[:, None, :].expand(num_tokens, top_k, hidden).reshape(-1, 1, hidden)
    g = _slot_expand(gate_base.to(compute), lora_b_gate.to(compute),
                     _slot_shrink(x_slots, lora_a_gate.to(compute), flat), flat, top_k, scaling)
    u = _slot_expand(up_base.to(compute), lora_b_up.to(compute),
                     _slot_shrink(x_slots, lora_a_up.to(compute), flat), flat, top_k, scaling)
    h = act(activation, g).mul_(u).mul_(weights.to(compute).reshape(-1, 1, 1))    # w_k h_k, (T·K, 1, F)
    h_c = h.view(num_tokens, top_k, -1).sum(1)
    a_d = torch.bmm(h, _gather(lora_a_down.to(compute), flat).transpose(1, 2))     # (T·K, 1, R)
    z = a_d.new_zeros(num_tokens, num_experts, rank).scatter_add_(
        1, indices[:, :, None].expand(num_tokens, top_k, rank), a_d.view(num_tokens, top_k, rank))
    return h_c.to(x.dtype), z.view(num_tokens, num_experts * rank).to(x.dtype)
