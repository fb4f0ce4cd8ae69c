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


def assert_same_routing(indices, ref_probs, ref_indices, dtype, name="indices"):
    """`indices` is a top-K of `ref_probs`, slot by slot, up to the dtype's tolerance.

    Two backends compute probabilities that agree only to rounding, so experts whose
    probabilities are that close may come out in either order (or, at the K boundary, either
    may be chosen). Anything else is a routing error: for every token and slot k the chosen
    expert's reference probability must equal the k-th largest reference probability within
    the tolerance. Picking an expert clearly below the top-K, or a clearly wrong order, fails.
    """
    atol, rtol = TOLERANCES[dtype]
    assert indices.shape == ref_indices.shape and indices.dtype == torch.int64, name
    chosen = ref_probs.gather(1, indices)
    expected = ref_probs.gather(1, ref_indices)
    torch.testing.assert_close(chosen, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: chosen experts are not a top-K of the reference: {m}")
    assert (indices.sort(1).values.diff(dim=1) != 0).all(), f"{name}: an expert chosen twice for one token"
