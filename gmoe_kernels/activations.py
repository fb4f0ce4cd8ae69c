"""Elementwise activations with their derivatives, shared by every backend.

The fused paths recompute act(g) and act'(g) in backward instead of saving them, so
each supported activation is listed here with both. Names follow `transformers`'
`hidden_act` strings; `canonical_activation` maps the aliases.
"""
from __future__ import annotations

import math

import torch

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")

_ALIASES = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs (gradcheck), fp32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def canonical_activation(name: str) -> str:
    """Map a `transformers` activation name to one of ACTIVATIONS, or raise ValueError."""
    key = str(name).lower()
    if key not in _ALIASES:
        raise ValueError(
            f"activation {name!r} is not supported; supported: {sorted(_ALIASES)}"
        )
    return _ALIASES[key]


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def act(name: str, g: torch.Tensor) -> torch.Tensor:
    """act(g) for a canonical activation name."""
    if name == "silu":
        return torch.nn.functional.silu(g)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(g, approximate="tanh")
    if name == "gelu":
        return torch.nn.functional.gelu(g)
    if name == "relu":
        return torch.relu(g)
    raise ValueError(f"activation {name!r} is not one of {ACTIVATIONS}")


def act_grad(name: str, g: torch.Tensor) -> torch.Tensor:
    """d act(g) / d g, elementwise."""
    if name == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (g + 0.044715 * g**3)
        t = torch.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * g**2)
        return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * d_inner
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
        return cdf + g * pdf
    if name == "relu":
        return (g > 0).to(g.dtype)
    raise ValueError(f"activation {name!r} is not one of {ACTIVATIONS}")


def act_backward(name: str, grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad * act'(g), in one pass: ATen's own backward kernels (what autograd runs for
    `act`), instead of the several elementwise passes of `grad * act_grad(name, g)`."""
    aten = torch.ops.aten
    if name == "silu":
        return aten.silu_backward(grad, g)
    if name == "gelu_tanh":
        return aten.gelu_backward(grad, g, approximate="tanh")
    if name == "gelu":
        return aten.gelu_backward(grad, g)
    if name == "relu":
        return aten.threshold_backward(grad, g, 0)
    raise ValueError(f"activation {name!r} is not one of {ACTIVATIONS}")
