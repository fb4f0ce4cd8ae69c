"""Activations and their derivatives for the Triton kernels (only @triton.jit code).

Operands must be fp32/fp64 (tl.exp needs them); formulas match gmoe_kernels.activations.
"""
import triton
import triton.language as tl


@triton.jit
def act(g, ACTIVATION: tl.constexpr):
    """act(g) for g in fp32/fp64."""
    if ACTIVATION == "silu":
        out = g / (1.0 + tl.exp(-g))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 g (1 + tanh(c (g + 0.044715 g^3))) = g * sigmoid(2 c (g + 0.044715 g^3))
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        out = g / (1.0 + tl.exp(-2.0 * inner))
    elif ACTIVATION == "gelu":
        out = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:  # relu
        out = tl.where(g > 0, g, 0.0)
    return out


@triton.jit
def act_and_grad(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) for g in fp32/fp64; matches gmoe_kernels.activations.act_grad."""
    if ACTIVATION == "silu":
        sig = 1.0 / (1.0 + tl.exp(-g))
        out = g * sig
        grad = sig * (1.0 + g * (1.0 - sig))
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        d_inner = 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        sig = 1.0 / (1.0 + tl.exp(-2.0 * inner))  # (1 + tanh(inner)) / 2
        out = g * sig
        # 0.5 (1 + t) + 0.5 g (1 - t^2) d_inner with 1 + t = 2 sig, 1 - t^2 = 4 sig (1 - sig)
        grad = sig + 2.0 * g * sig * (1.0 - sig) * d_inner
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        out = g * cdf
        grad = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    else:  # relu
        out = tl.where(g > 0, g, 0.0)
        grad = tl.where(g > 0, 1.0, 0.0).to(g.dtype)
    return out, grad


@triton.jit
def act_grad(g, ACTIVATION: tl.constexpr):
    """act'(g) alone."""
    _, grad = act_and_grad(g, ACTIVATION)
    return grad
