"""The expert mix as a registered op (`gmoe_kernels.registration`), for either backend.

The reference twin (`reference/expert_mix.py`, PyTorch) and the Triton backend
(`triton/expert_mix.py`) register ops with one signature, one fake, one saved state and one
autograd rule; only the two computations differ, and they are passed in. The op is opaque, so
torch.compile traces a GMoE layer whole: inside, the pairs are grouped with data-dependent
shapes (bincount, .tolist()).
"""
from __future__ import annotations

from typing import Callable

import torch

from .registration import register_differentiable_op

# Positions among the op's inputs: the first SAVED are tensors (saved for backward), of which
# `indices` has no gradient; then the settings scaling and activation.
INDICES_POS, WEIGHTS_POS, SAVED = 8, 9, 10


def register_expert_mix(name: str, forward: Callable, backward: Callable):
    """Register `gmoe_kernels::<name>` running `forward(x, gate_base, up_base, lora_a_gate,
    lora_b_gate, lora_a_up, lora_b_up, lora_a_down, indices, weights, scaling, activation)`
    -> (h_c, z) and `backward(grad_h_c, grad_z, <the same arguments>)` -> the 9 gradients
    (all inputs but indices, scaling and activation), and return the differentiable op."""

    def forward_op(x: torch.Tensor, gate_base: torch.Tensor, up_base: torch.Tensor,
                   lora_a_gate: torch.Tensor, lora_b_gate: torch.Tensor, lora_a_up: torch.Tensor,
                   lora_b_up: torch.Tensor, lora_a_down: torch.Tensor, indices: torch.Tensor,
                   weights: torch.Tensor, scaling: float, activation: str,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                       lora_a_down, indices, weights, scaling, activation)

    def backward_op(grad_h_c: torch.Tensor, grad_z: torch.Tensor, x: torch.Tensor,
                    gate_base: torch.Tensor, up_base: torch.Tensor, lora_a_gate: torch.Tensor,
                    lora_b_gate: torch.Tensor, lora_a_up: torch.Tensor, lora_b_up: torch.Tensor,
                    lora_a_down: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                    scaling: float, activation: str) -> list[torch.Tensor]:
        return list(backward(grad_h_c, grad_z, x, gate_base, up_base, lora_a_gate, lora_b_gate,
                             lora_a_up, lora_b_up, lora_a_down, indices, weights, scaling,
                             activation))

    def autograd_backward(ctx, grad_h_c, grad_z):
        """Backward of the expert mix (dh_c = dL/dh_c, b_k = dL/dz[t, e_k]; pair k of token t
        routed to expert e). Forward: h_c[t] = sum_k w_k h_k, z[t, e_k] = w_k A_d^{e_k} h_k with
        g_k = G[t] + s B_g^{e_k} A_g^{e_k} x_t, u_k = U[t] + s B_u^{e_k} A_u^{e_k} x_t,
        h_k = act(g_k) * u_k (recomputed by `backward`, not saved).
          q_k    = dh_c[t] + A_d^e^T b_k;        dh_k = w_k q_k
          dw_k   = <h_k, q_k> = <h_k, dh_c[t]> + <A_d^e h_k, b_k>
          dA_d^e = sum_{k: e_k = e} w_k b_k h_k^T
          dg_k   = dh_k * u_k * act'(g_k);        du_k = dh_k * act(g_k)
          dG[t]  = sum_k dg_k;                    dU[t] = sum_k du_k
          d(A_g^e x_t) = s B_g^e^T dg_k;          dB_g^e = s sum_k dg_k (A_g^e x_t)^T  (up likewise)
          dA_g^e = sum_t d(A_g^e x_t) x_t^T;      dx = sum_e d(A_g^e x)^T A_g^e + (up)
        No gradient for indices, scaling, activation.
        """
        saved = ctx.saved_tensors
        x, gate_base, lora_a_gate = saved[0], saved[1], saved[3]
        num_experts, rank, _ = lora_a_gate.shape
        if grad_h_c is None:
            grad_h_c = torch.zeros_like(gate_base, dtype=x.dtype)
        if grad_z is None:
            grad_z = x.new_zeros((x.shape[0], num_experts * rank))
        grads = ops[1](grad_h_c, grad_z, *saved, ctx.scaling, ctx.activation)  # the backward op
        need = ctx.needs_input_grad
        d = [g if needed else None for g, needed in zip(grads, need[:INDICES_POS] + (need[WEIGHTS_POS],))]
        return (*d[:INDICES_POS], None, d[INDICES_POS], None, None)

    # autograd_backward reads ops[1], assigned here before any backward can run
    ops = register_differentiable_op(
        name, forward=forward_op, forward_fake=_forward_fake, backward=backward_op,
        backward_fake=_backward_fake, setup_context=_setup_context,
        autograd_backward=autograd_backward)
    return ops[0]


def _forward_fake(x, gate_base, up_base, lora_a_gate, *rest):
    num_experts, rank, _ = lora_a_gate.shape
    return (x.new_empty((x.shape[0], gate_base.shape[1])),
            x.new_empty((x.shape[0], num_experts * rank)))


def _backward_fake(grad_h_c, grad_z, *saved_and_settings):
    saved = saved_and_settings[:SAVED]
    return [torch.empty_like(t) for i, t in enumerate(saved) if i != INDICES_POS]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:SAVED])   # x, G, U, the five LoRA tensors, indices, weights
    ctx.scaling, ctx.activation = float(inputs[SAVED]), inputs[SAVED + 1]
