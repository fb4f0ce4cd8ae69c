"""How every differentiable op of this package is registered with PyTorch: one pattern.

An op `name` is two `torch.library.custom_op`s in the `gmoe_kernels` namespace,
`gmoe_kernels::<name>` and `gmoe_kernels::<name>_backward`, each with a fake (meta)
implementation, and autograd registered on the forward op with `register_autograd`:

- `forward(...)` and `backward(...)` are typed functions (the schema is read from their
  annotations) that run the computation: Triton launchers or the reference's PyTorch code;
- `setup_context(ctx, inputs, output)` saves tensors with `ctx.save_for_backward` only
  (non-tensor settings such as `scaling` or `top_k` may sit on ctx);
- `autograd_backward(ctx, *grads)` reads `ctx.saved_tensors` and calls the backward op.

Both directions are then opaque to torch.compile, which traces a model through them with
the fakes (no kernel runs while tracing, no graph break), and the backward maths is written
once, in the docstring of the module's `autograd_backward`.
"""
from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "gmoe_kernels"


def register_differentiable_op(name: str, *, forward: Callable, forward_fake: Callable,
                               backward: Callable, backward_fake: Callable,
                               setup_context: Callable, autograd_backward: Callable):
    """Register `gmoe_kernels::<name>` and `gmoe_kernels::<name>_backward` (see the module
    docstring) and return both ops (callable like `torch.ops.gmoe_kernels.<name>`)."""
    forward_op = torch.library.custom_op(f"{NAMESPACE}::{name}", forward, mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"{NAMESPACE}::{name}_backward", backward,
                                          mutates_args=())
    backward_op.register_fake(backward_fake)
    forward_op.register_autograd(autograd_backward, setup_context=setup_context)
    return forward_op, backward_op


class DeprecatedFunction:
    """Stand-in for a removed `torch.autograd.Function` of this package: `apply(*args)` runs
    the registered op that replaced it (same arguments, same results, differentiable)."""

    def __init__(self, old: str, op, new: str):
        self._old, self._op, self._new = old, op, new

    def apply(self, *args):
        import warnings

        warnings.warn(f"{self._old}.apply is deprecated: call {self._new}", DeprecationWarning,
                      stacklevel=2)
        return self._op(*args)
