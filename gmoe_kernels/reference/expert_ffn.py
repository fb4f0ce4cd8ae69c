"""Reference twin of the fused expert mix: the fast algebra of DESIGN.md in plain PyTorch.

The frozen GEMMs (W_g x, W_u x, W_d h_c) live outside this op (in `functional.expert_ffn`);
this op does everything per (token, chosen expert) in between:

  h_k = act(g_k) * u_k,  g_k = G[t] + s B_g^e (A_g^e x_t),  u_k = U[t] + s B_u^e (A_u^e x_t)
  h_c[t] = sum_k w_k h_k                         (fed to the frozen down projection once)
  z[t, e_k] = w_k A_d^e h_k                      (fed to one small GEMM with the stacked B_d)

It runs grouped by expert (rows gathered per expert, one small GEMM each) and saves only
x, G, U, the indices and weights: the per-pair [T·K, F] states are recomputed in backward,
which is what makes it beat the per-expert loop on CPU as well (see DESIGN.md).
"""
from __future__ import annotations

import torch

from ..activations import act, act_grad, compute_dtype
from .routing import make_routing_plan


def _shrink(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """x (T, H) times every expert's A (E, R, H) at once: one GEMM, returns (T, E, R)."""
    num_experts, rank, hidden = lora_a.shape
    return (x @ lora_a.reshape(num_experts * rank, hidden).t()).view(-1, num_experts, rank)


def _add_rows(target, tok, e, rows):
    """target[tok, e] += rows, summing repeats: a token that lists expert e in two slots
    (never from top-k, possible from a caller) contributes twice, as in the per-pair maths."""
    target.index_put_((tok, torch.full_like(tok, e)), rows, accumulate=True)


def _expert_groups(indices: torch.Tensor, num_experts: int):
    """Yield (expert, token ids, pair ids) for every expert that received tokens."""
    plan = make_routing_plan(indices, num_experts)
    offsets = plan.expert_offsets.tolist()  # the reference path may synchronise; kernels do not
    for e in range(num_experts):
        if offsets[e] == offsets[e + 1]:
            continue
        pairs = plan.sorted_pairs[offsets[e] : offsets[e + 1]]
        yield e, pairs // plan.top_k, pairs


class ExpertMixFunction(torch.autograd.Function):
    """Fused expert mix, reference backend.

    Backward (dh_c = dL/dh_c, b = dL/dz[t, e_k]; per pair k of token t routed to expert e):
      dh_k   = w_k (dh_c[t] + A_d^e^T b)
      dw_k   = <h_k, dh_c[t]> + <A_d^e h_k, b>
      dA_d^e = sum_k w_k b h_k^T
      dg_k   = dh_k * u_k * act'(g_k);   du_k = dh_k * act(g_k)
      dG[t]  = sum_k dg_k;               dU[t] = sum_k du_k
      d(A_g^e x_t) = s B_g^e^T dg_k;     dB_g^e = s sum_k dg_k (A_g^e x_t)^T   (likewise for up)
      dA_g^e = sum_t d(A_g^e x_t) x_t^T; dx = sum_e d(A_g^e x)^T A_g^e + (up)
    All sums run in fp32 (fp64 for fp64 inputs) and are deterministic (index_add_ on CPU; per-expert GEMMs).
    """

    @staticmethod
    def forward(ctx, x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                lora_a_down, indices, weights, scaling, activation):
        num_experts, rank, _ = lora_a_gate.shape
        num_tokens = x.shape[0]
        f32 = compute_dtype(x)
        shrink_g = _shrink(x.to(f32), lora_a_gate.to(f32))
        shrink_u = _shrink(x.to(f32), lora_a_up.to(f32))
        w_flat = weights.to(f32).reshape(-1)
        h_c = torch.zeros(num_tokens, gate_base.shape[1], dtype=f32, device=x.device)
        z = torch.zeros(num_tokens, num_experts, rank, dtype=f32, device=x.device)
        for e, tok, pairs in _expert_groups(indices, num_experts):
            w = w_flat[pairs].unsqueeze(1)
            g = gate_base[tok].to(f32) + scaling * shrink_g[tok, e] @ lora_b_gate[e].to(f32).t()
            u = up_base[tok].to(f32) + scaling * shrink_u[tok, e] @ lora_b_up[e].to(f32).t()
            h = act(activation, g) * u
            h_c.index_add_(0, tok, w * h)
            _add_rows(z, tok, e, w * (h @ lora_a_down[e].to(f32).t()))
        ctx.save_for_backward(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up,
                              lora_b_up, lora_a_down, indices, weights)
        ctx.scaling, ctx.activation = scaling, activation
        return h_c.to(x.dtype), z.view(num_tokens, num_experts * rank).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_h_c, grad_z):
        (x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up, lora_a_down,
         indices, weights) = ctx.saved_tensors
        s, name = ctx.scaling, ctx.activation
        f32 = compute_dtype(x)
        num_experts, rank, _ = lora_a_gate.shape
        num_tokens, top_k = indices.shape
        xf = x.to(f32)
        a_g, b_g, a_u, b_u, a_d = (t.to(f32) for t in
                                   (lora_a_gate, lora_b_gate, lora_a_up, lora_b_up, lora_a_down))
        grad_h_c = grad_h_c.to(f32)
        grad_z = grad_z.to(f32).view(num_tokens, num_experts, rank)
        shrink_g, shrink_u = _shrink(xf, a_g), _shrink(xf, a_u)
        w_flat = weights.to(f32).reshape(-1)

        d_gate_base = torch.zeros_like(gate_base, dtype=f32)
        d_up_base = torch.zeros_like(up_base, dtype=f32)
        d_shrink_g = torch.zeros_like(shrink_g)
        d_shrink_u = torch.zeros_like(shrink_u)
        d_b_g, d_b_u, d_a_d = torch.zeros_like(b_g), torch.zeros_like(b_u), torch.zeros_like(a_d)
        d_w = torch.zeros(num_tokens * top_k, dtype=f32, device=x.device)
        for e, tok, pairs in _expert_groups(indices, num_experts):
            w = w_flat[pairs].unsqueeze(1)
            sg, su = shrink_g[tok, e], shrink_u[tok, e]
            g = gate_base[tok].to(f32) + s * sg @ b_g[e].t()
            u = up_base[tok].to(f32) + s * su @ b_u[e].t()
            act_g = act(name, g)
            h = act_g * u
            b = grad_z[tok, e]
            dh_c = grad_h_c[tok]
            d_w[pairs] = (h * dh_c).sum(1) + ((h @ a_d[e].t()) * b).sum(1)
            d_a_d[e] = (w * b).t() @ h
            dh = w * (dh_c + b @ a_d[e])
            dg = dh * u * act_grad(name, g)
            du = dh * act_g
            d_gate_base.index_add_(0, tok, dg)
            d_up_base.index_add_(0, tok, du)
            d_b_g[e] = s * dg.t() @ sg
            d_b_u[e] = s * du.t() @ su
            _add_rows(d_shrink_g, tok, e, s * dg @ b_g[e])
            _add_rows(d_shrink_u, tok, e, s * du @ b_u[e])
        flat_g = d_shrink_g.view(num_tokens, num_experts * rank)
        flat_u = d_shrink_u.view(num_tokens, num_experts * rank)
        d_x = flat_g @ a_g.reshape(num_experts * rank, -1) + flat_u @ a_u.reshape(num_experts * rank, -1)
        d_a_g = (flat_g.t() @ xf).view_as(a_g)
        d_a_u = (flat_u.t() @ xf).view_as(a_u)

        def cast(grad, like, needed):
            return grad.to(like.dtype) if needed else None

        need = ctx.needs_input_grad
        return (cast(d_x, x, need[0]), cast(d_gate_base, gate_base, need[1]),
                cast(d_up_base, up_base, need[2]), cast(d_a_g, lora_a_gate, need[3]),
                cast(d_b_g, lora_b_gate, need[4]), cast(d_a_u, lora_a_up, need[5]),
                cast(d_b_u, lora_b_up, need[6]), cast(d_a_d, lora_a_down, need[7]), None,
                cast(d_w.view(num_tokens, top_k), weights, need[9]), None, None)


def expert_mix(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
               lora_a_down, indices, weights, scaling: float, activation: str):
    """Reference backend of `gmoe_kernels.functional.expert_mix` (see there for shapes)."""
    return ExpertMixFunction.apply(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up,
                                   lora_b_up, lora_a_down, indices, weights, float(scaling),
                                   activation)
