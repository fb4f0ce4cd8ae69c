"""The expert mix for a handful of tokens over every expert: each LoRA factor stack read once, in
place, with no routing plan and no gathered copies.

Same signature and results as `expert_mix.expert_mix` (the maths of its module docstring):

  g_k = G[t] + s B_g^{e_k} (A_g^{e_k} x_t),  u_k likewise,  h_k = act(g_k) * u_k
  h_c[t] = sum_k w_k h_k,   z[t, e_k] += w_k A_d^{e_k} h_k

Here every expert's shrink and expand is computed for every token, (E, T, F) with batched matmuls
over the experts on the factor stacks as they are stored, and each (token, slot) takes its
expert's row. Decoding at a few tokens is bound by the bytes read, not the arithmetic: this
reads each stack once (E·(2·H + 3·F)·R elements), where the gathered path
(`expert_mix_gathered`) copies T·K experts' factors and reads the copies again. So it pays from
about E/K tokens, where the gathered copies outgrow the stacks, up to the count where the E/K
times larger arithmetic catches up with the routing plan (`gmoe_kernels.small_batch`).

Differentiable by autograd (matmuls, indexing and elementwise ops); the dispatch uses it only
where no gradient is recorded.
"""
from __future__ import annotations

import torch

from ..activations import act, compute_dtype


def _every_expert(x, base, lora_a, lora_b, chosen, scaling):
    """(T, K, F): base[t] + s B^{e_k} A^{e_k} x_t, from every expert's product (E, T, F)."""
    num_experts, rank, hidden = lora_a.shape
    shrink = (x @ lora_a.reshape(num_experts * rank, hidden).t()).view(-1, num_experts, rank)  # (T, E, R)
    expand = torch.bmm(shrink.transpose(0, 1), lora_b.transpose(1, 2))                          # (E, T, F)
    return torch.add(base[:, None, :], expand[chosen], alpha=scaling)


def expert_mix_dense(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                     lora_a_down, indices, weights, scaling: float, activation: str):
    """h_c (T, F) and z (T, E·R) in x's dtype; shapes as `functional.expert_mix`. Sums in fp32
    (fp64 for fp64 x)."""
    compute = compute_dtype(x)
    num_experts, rank, _ = lora_a_gate.shape
    num_tokens, top_k = indices.shape
    size_f = gate_base.shape[1]
    tokens = torch.arange(num_tokens, device=indices.device)[:, None].expand(num_tokens, top_k)
    chosen = (indices, tokens)          # (expert, token) of every (token, slot), for (E, T, …) rows
    xc = x.to(compute)
    g = _every_expert(xc, gate_base.to(compute), lora_a_gate.to(compute), lora_b_gate.to(compute), chosen, scaling)
    u = _every_expert(xc, up_base.to(compute), lora_a_up.to(compute), lora_b_up.to(compute), chosen, scaling)
    h = act(activation, g).mul_(u).mul_(weights.to(compute)[:, :, None])                         # w_k h_k (T, K, F)
    h_c = h.sum(1)
    a_d = lora_a_down.to(compute).reshape(num_experts * rank, size_f)
    down = (h.reshape(-1, size_f) @ a_d.t()).view(num_tokens, top_k, num_experts, rank)         # every expert's A_d h_k
    slots = torch.arange(top_k, device=indices.device)[None, :].expand(num_tokens, top_k)
    z = down.new_zeros(num_tokens, num_experts, rank).index_put_(
        (tokens, indices), down[tokens, slots, indices], accumulate=True)
    return h_c.to(x.dtype), z.view(num_tokens, num_experts * rank).to(x.dtype)
