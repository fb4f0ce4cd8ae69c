"""Reference twin of the fused expert mix: the fast algebra of DESIGN.md in plain PyTorch.

The frozen GEMMs (W_g x, W_u x, W_d h_c) live outside this op (in `functional.expert_ffn`);
this op does everything per (token, chosen expert) in between:

  h_k = act(g_k) * u_k,  g_k = G[t] + s B_g^e (A_g^e x_t),  u_k = U[t] + s B_u^e (A_u^e x_t)
  h_c[t] = sum_k w_k h_k                         (fed to the frozen down projection once)
  z[t, e_k] = w_k A_d^e h_k                      (fed to one small GEMM with the stacked B_d)

It runs on the pairs sorted by expert (gathered once; one small GEMM per expert on a
contiguous slice; elementwise work over all pairs at once) and saves only x, G, U, the
indices and weights: the per-pair [T·K, F] states are recomputed in backward, which is what
makes it beat the per-expert loop on CPU as well (see DESIGN.md).
"""
from __future__ import annotations

import torch

from ..activations import act, act_backward, compute_dtype
from ..expert_mix_op import register_expert_mix
from .routing import make_routing_plan


def _shrink(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """x (T, H) times every expert's A (E, R, H) at once: one GEMM, returns (T, E, R)."""
    num_experts, rank, hidden = lora_a.shape
    return (x @ lora_a.reshape(num_experts * rank, hidden).t()).view(-1, num_experts, rank)


class _Pairs:
    """The T·K (token, slot) pairs sorted by expert, so that expert e's pairs are the
    contiguous rows lo:hi of every per-pair tensor: each per-pair state is gathered once for
    all experts, the per-expert GEMMs work on slices in place, and the elementwise work runs
    as one op over all pairs instead of E small ones (on a CPU at SmolLM2 size that per-op
    overhead, not arithmetic, was most of this op's time; see benchmarks/NOTES.md)."""

    def __init__(self, indices: torch.Tensor, num_experts: int, weights: torch.Tensor, compute):
        plan = make_routing_plan(indices, num_experts)
        self.num_tokens, self.top_k = plan.num_tokens, plan.top_k
        self.order, self.inverse = plan.sorted_pairs, plan.inverse
        self.token = plan.sorted_pairs // plan.top_k                 # (P,) token of each sorted pair
        self.expert = indices.reshape(-1).index_select(0, plan.sorted_pairs)
        self.weight = weights.to(compute).reshape(-1).index_select(0, plan.sorted_pairs).unsqueeze(1)
        offsets = plan.expert_offsets.tolist()  # the reference path may synchronise; kernels do not
        self.spans = [(e, offsets[e], offsets[e + 1]) for e in range(num_experts) if offsets[e] < offsets[e + 1]]

    def rows(self, per_token: torch.Tensor, compute) -> torch.Tensor:
        """(T, N) -> (P, N): a fresh copy, in sorted pair order (safe to update in place)."""
        out = per_token.index_select(0, self.token)
        return out if out.dtype == compute else out.to(compute)

    def blocks(self, per_token_expert: torch.Tensor) -> torch.Tensor:
        """(T, E, R) -> (P, R): each pair's block of its own expert."""
        return per_token_expert[self.token, self.expert]

    def to_tokens(self, per_pair: torch.Tensor) -> torch.Tensor:
        """(P, N) -> (T, N): sum over each token's K pairs."""
        out = per_pair.new_zeros(self.num_tokens, per_pair.shape[1])
        return out.index_add_(0, self.token, per_pair)

    def to_blocks(self, per_pair: torch.Tensor, num_experts: int) -> torch.Tensor:
        """(P, R) -> (T, E, R) with each pair's rows added into its (token, expert) block:
        a token that lists expert e in two slots (never from top-k, possible from a caller)
        contributes twice, as in the per-pair maths."""
        out = per_pair.new_zeros(self.num_tokens, num_experts, per_pair.shape[1])
        return out.index_put_((self.token, self.expert), per_pair, accumulate=True)

    # The two per-expert products below are written in the GEMM orientation that ATen's CPU
    # BLAS runs fastest for a rank-R side: (R, F) x (F, n) and (R, n) x (n, F), both 2-3x
    # faster here than the same products as (n, F) x (F, R) and (F, n) x (n, R).
    def project(self, rows: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
        """(P, F) rows, mats (E, M, F) -> (P, M): each pair's row times its expert's mats[e]^T."""
        out = rows.new_empty(rows.shape[0], mats.shape[1])
        for e, lo, hi in self.spans:
            out[lo:hi] = (mats[e] @ rows[lo:hi].t()).t()
        return out

    def outer(self, small: torch.Tensor, rows: torch.Tensor, num_experts: int) -> torch.Tensor:
        """(P, M), (P, F) -> (E, M, F): per expert, the sum over its pairs of small_p rows_p^T
        (zero for an expert without pairs)."""
        out = rows.new_zeros(num_experts, small.shape[1], rows.shape[1])
        for e, lo, hi in self.spans:
            torch.mm(small[lo:hi].t(), rows[lo:hi], out=out[e])
        return out

    def gate_up(self, gate_base, up_base, shrink_g, shrink_u, b_g, b_u, scaling, compute):
        """Per-pair g = G[t] + s B_g^e (A_g^e x_t) and u likewise, both (P, F)."""
        g, u = self.rows(gate_base, compute), self.rows(up_base, compute)
        for e, lo, hi in self.spans:
            g[lo:hi].addmm_(shrink_g[lo:hi], b_g[e].t(), alpha=scaling)
            u[lo:hi].addmm_(shrink_u[lo:hi], b_u[e].t(), alpha=scaling)
        return g, u


def expert_mix_forward(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                       lora_a_down, indices, weights, scaling: float, activation: str):
    """h_c (T, F) and z (T, E·R), in x's dtype; see the module docstring."""
    num_experts, rank, _ = lora_a_gate.shape
    compute = compute_dtype(x)
    pairs = _Pairs(indices, num_experts, weights, compute)
    xf = x.to(compute)
    shrink_g = pairs.blocks(_shrink(xf, lora_a_gate.to(compute)))
    shrink_u = pairs.blocks(_shrink(xf, lora_a_up.to(compute)))
    g, u = pairs.gate_up(gate_base, up_base, shrink_g, shrink_u, lora_b_gate.to(compute),
                         lora_b_up.to(compute), scaling, compute)
    h = act(activation, g).mul_(u).mul_(pairs.weight)        # w_k h_k, (P, F)
    del g, u
    z = pairs.to_blocks(pairs.project(h, lora_a_down.to(compute)), num_experts)
    h_c = pairs.to_tokens(h)
    return h_c.to(x.dtype), z.view(pairs.num_tokens, num_experts * rank).to(x.dtype)


def expert_mix_backward(grad_h_c, grad_z, x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up,
                        lora_b_up, lora_a_down, indices, weights, scaling: float, activation: str):
    """Gradients of x, gate_base, up_base, the five LoRA tensors and weights (each in its input's dtype).

    Backward (dh_c = dL/dh_c, b = dL/dz[t, e_k]; per pair k of token t routed to expert e):
      dh_k   = w_k (dh_c[t] + A_d^e^T b)
      dw_k   = <h_k, dh_c[t]> + <A_d^e h_k, b>
      dA_d^e = sum_k w_k b h_k^T
      dg_k   = dh_k * u_k * act'(g_k);   du_k = dh_k * act(g_k)
      dG[t]  = sum_k dg_k;               dU[t] = sum_k du_k
      d(A_g^e x_t) = s B_g^e^T dg_k;     dB_g^e = s sum_k dg_k (A_g^e x_t)^T   (likewise for up)
      dA_g^e = sum_t d(A_g^e x_t) x_t^T; dx = sum_e d(A_g^e x)^T A_g^e + (up)
    All sums run in fp32 (fp64 for fp64 inputs) and are deterministic (index_add_ and
    index_put_ on CPU; per-expert GEMMs).
    """
    s, name = scaling, activation
    compute = compute_dtype(x)
    num_experts, rank, _ = lora_a_gate.shape
    num_tokens, top_k = indices.shape
    xf = x.to(compute)
    a_g, b_g, a_u, b_u, a_d = (t.to(compute) for t in
                               (lora_a_gate, lora_b_gate, lora_a_up, lora_b_up, lora_a_down))
    pairs = _Pairs(indices, num_experts, weights, compute)
    sg, su = pairs.blocks(_shrink(xf, a_g)), pairs.blocks(_shrink(xf, a_u))
    g, u = pairs.gate_up(gate_base, up_base, sg, su, b_g, b_u, s, compute)
    act_g = act(name, g)
    h = act_g * u                                               # unweighted h_k
    b = pairs.blocks(grad_z.to(compute).view(num_tokens, num_experts, rank))   # (P, R)
    dh = pairs.rows(grad_h_c, compute)                              # dh_c[t] per pair
    d_a_d = pairs.outer(pairs.weight * b, h, num_experts)
    for e, lo, hi in pairs.spans:
        dh[lo:hi].addmm_(b[lo:hi], a_d[e])                      # dh_c[t] + A_d^T b
    # dw_k = <h_k, dh_c[t]> + <A_d h_k, b> = <h_k, dh_c[t] + A_d^T b>: one pass, no A_d h_k
    d_w = torch.linalg.vecdot(h, dh)
    del h
    dh.mul_(pairs.weight)                                       # dh_k
    du = dh * act_g
    del act_g
    dg = act_backward(name, dh.mul_(u), g)                      # dh_k * u_k * act'(g_k)
    del g, u, dh
    d_b_g = pairs.outer(sg, dg, num_experts).transpose(1, 2).contiguous().mul_(s)  # (E, F, R)
    d_b_u = pairs.outer(su, du, num_experts).transpose(1, 2).contiguous().mul_(s)
    flat_g = pairs.to_blocks(pairs.project(dg, b_g.transpose(1, 2).contiguous()), num_experts)
    flat_u = pairs.to_blocks(pairs.project(du, b_u.transpose(1, 2).contiguous()), num_experts)
    flat_g = flat_g.view(num_tokens, num_experts * rank).mul_(s)
    flat_u = flat_u.view(num_tokens, num_experts * rank).mul_(s)
    d_x = flat_g @ a_g.reshape(num_experts * rank, -1) + flat_u @ a_u.reshape(num_experts * rank, -1)
    d_a_g = (flat_g.t() @ xf).view_as(a_g)
    d_a_u = (flat_u.t() @ xf).view_as(a_u)

    d_w = d_w.index_select(0, pairs.inverse).view(num_tokens, top_k)
    grads = (d_x, pairs.to_tokens(dg), pairs.to_tokens(du), d_a_g, d_b_g, d_a_u, d_b_u, d_a_d, d_w)
    likes = (x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up, lora_a_down, weights)
    return [grad.to(like.dtype) for grad, like in zip(grads, likes)]


# One opaque custom op (as the Triton backend is): gmoe_kernels.expert_mix_op.
_expert_mix_op = register_expert_mix("reference_expert_mix", expert_mix_forward, expert_mix_backward)


def expert_mix(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
               lora_a_down, indices, weights, scaling: float, activation: str):
    """Reference backend of `gmoe_kernels.functional.expert_mix` (see there for shapes): the custom
    op `torch.ops.gmoe_kernels.reference_expert_mix`, differentiable, traceable by torch.compile."""
    return _expert_mix_op(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                          lora_a_down, indices, weights, float(scaling), activation)
