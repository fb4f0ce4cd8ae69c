"""One tolerance table per dtype, used by every comparison in the tests.

(atol, rtol) for outputs and gradients of a fast path against the reference twin or the
per-expert oracle. Indices are always compared exactly.
"""
import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),   # GPU only: the interpreter computes bf16 wrongly
}


def assert_close(actual, expected, dtype=None, name=""):
    dtype = dtype or expected.dtype
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")
