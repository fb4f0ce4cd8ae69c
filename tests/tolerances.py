"""One tolerance table per dtype, used by every comparison in the tests, and the error model
of the GPU checks (tests/gpu/test_kernels.py measures with `measure` from here).

TOLERANCES: (atol, rtol) for outputs and gradients of a fast path against the reference twin
or the per-expert oracle, elementwise. Indices are always compared exactly.
"""
import math

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


# ------------------------------------------------------------------------------------------
# Error model of a kernel run in `dtype` against the reference run in fp64 on the same
# dtype-rounded inputs (tests/gpu/test_kernels.py), in the Frobenius norm.
#
# Input rounding is shared, so only what the low-precision path rounds on the way counts:
#  * a stored intermediate or output (a GEMM's result, a kernel's store, a tl.dot operand
#    cast to 16 bits, an autograd sum in the data dtype) is rounded once: elementwise
#    |δ| <= u|x| + η, so its Frobenius error is <= u·||x|| + η·sqrt(numel)
#    (u = 2^-8 bf16, 2^-11 fp16, 2^-24 fp32; η = half the smallest subnormal, 2^-25 in fp16,
#    where gradients can underflow: the router's d_x at GPU shapes lies entirely there);
#  * m such roundings are independent, so they add in quadrature: sqrt(m)·u. Measured on
#    the reference path and on the kernels under the interpreter (tests/test_tolerances.py)
#    a rounding costs ~0.4u (a uniform error weighted by |x|^2) and the stages' gains (act,
#    act', random matrices) stay near 1: the bound is 2.5-4x the measured error (room for
#    cuBLAS's reduced-precision split-K, PyTorch's default for 16-bit GEMMs, which may add
#    about one rounding per GEMM), and ~3x tighter than the 4e-2 it replaces;
#  * fp32 accumulation of n terms adds ~sqrt(n)·u_fp32 (random-walk rounding), counted as
#    2·sqrt(n)·u_fp32 with n the op's longest reduction (H, F or T). Negligible for 16-bit
#    data (8e-6 at n = 18944), it is the whole bound for fp32 data.
# K and R drop out. The mix h_c = sum_k w_k h_k has weights summing to 1, so the K per-slot
# errors (each ~u, independent or shared through G and U) never exceed one slot's; the
# R-long LoRA products keep the relative error of their rounded operands (random B, A:
# no cancellation) and their n = R or K·R terms are far shorter than H or F. What K and R
# do change is how large a real error is: a missing scale s or a wrong expert moves y by
# the LoRA's share of g (~0.1·sqrt(R/8) in the benchmark problem), 6u at R = 2 against a
# bound of 3.2u (it passed 4e-2 = 10u); the LoRA gradients move by ~100u.
#
# ROUNDINGS counts m on the Triton path of functional.expert_ffn (frozen GEMMs in the data
# dtype, the mix's kernels, the stacked down LoRA), taking the dot variant's operand casts:
#   forward:   G, U (2); shrink and h_k as tl.dot operands (2); h_c, z stores (2);
#              W_d h_c, z B_d^T, × s, the sum (4)
#   backward:  dh_c = dy W_d (1); dz = (s·dy) B_d (2); G, U, shrink recomputed (3);
#              b or dg as tl.dot operand (1); dG, dU stores (2); their GEMMs with W_g, W_u (2);
#              the mix's dx (1); autograd's two sums into dx (2); each weight's store (1).
# The graph router computes in fp32 for every dtype (the gain-100 token projection needs
# it): its logits, probs and weights round nothing (m = 0), its gradients once (to the
# leaf's dtype; m = 1). Its fp32 error is not well conditioned: softmax ignores a shift
# common to all logits, and GCN smoothing makes the nodes nearly equal, so the gradients
# of w_p, W_tok and x cancel (measured ~2000 u_fp32 at H 4096). The GPU test passes the
# reference's own fp32 error on the same inputs, and the bound adds 4× that.
# combine rounds its fp32 sum of K weighted rows once (m = 1); dispatch is a copy (exact).
# ------------------------------------------------------------------------------------------

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24,
                 torch.float64: 2.0 ** -53}
UNDERFLOW = {torch.bfloat16: 2.0 ** -134, torch.float16: 2.0 ** -25, torch.float32: 2.0 ** -150,
             torch.float64: 2.0 ** -1075}

ROUNDINGS = {
    "expert_ffn.y": 10,
    "expert_ffn.d_x": 14,
    "expert_ffn.d_weights": 7,        # dh_c, dz (2), G, U, shrink, h_k operand; kept fp32
    "expert_ffn.d_lora_a_gate": 9,    # the dg chain (dh_c, dz, G, U, shrink, operand) + store
    "expert_ffn.d_lora_b_gate": 9,
    "expert_ffn.d_lora_a_up": 9,
    "expert_ffn.d_lora_b_up": 9,
    "expert_ffn.d_lora_a_down": 8,    # dz (2), h (3), two tl.dot operands, store
    "expert_ffn.d_lora_b_down": 7,    # s·dy, z's chain (5), the GEMM's output
    "router.logits": 0, "router.probs": 0, "router.weights": 0,
    "router.d_x": 1, "router.d_token_weight": 1, "router.d_expert_weight": 1,
    "router.d_gcn_weight": 1, "router.d_score_weight": 1,
    "routing.combine": 1,
}


def relative_tolerance(quantity: str, dtype: torch.dtype, reduction: int) -> float:
    """The model's bound on ||got - want|| / ||want|| without underflow or ill-conditioning:
    sqrt(m)·u + 2·sqrt(n)·u_acc, m = ROUNDINGS[quantity], n = `reduction`, the op's longest
    accumulation (fp32, or fp64 for fp64 data). Independent of K and R (see above)."""
    u_acc = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    return math.sqrt(ROUNDINGS[quantity]) * UNIT_ROUNDOFF[dtype] + 2 * math.sqrt(reduction) * u_acc


def error_bound(quantity: str, dtype: torch.dtype, want: torch.Tensor, reduction: int,
                fp32_error: float = 0.0) -> float:
    """Largest ||got - want||_F a correct kernel leaves against `want` (the fp64 reference):
    relative_tolerance·||want|| + η·sqrt(m·numel) (underflow) + 4·fp32_error, the last the
    Frobenius error of an fp32 reference on the same inputs (ill-conditioned ops, the router)."""
    norm = want.detach().double().norm().item()
    floor = UNDERFLOW[dtype] * math.sqrt(ROUNDINGS[quantity] * want.numel())
    return relative_tolerance(quantity, dtype, reduction) * norm + floor + 4 * fp32_error


def frobenius_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.detach().double() - want.detach().double()).norm().item()


def measure(op, dtype, names, got, want, reduction, fp32=None):
    """(name, Frobenius error, its error_bound, ||want||, finite) of each output of `op`;
    `fp32`: an fp32 reference's outputs, whose own error enters the bound (router)."""
    rows = []
    for i, (name, a, b) in enumerate(zip(names, got, want, strict=True)):
        extra = frobenius_error(fp32[i], b) if fp32 is not None else 0.0
        bound = error_bound(f"{op}.{name}", dtype, b, reduction, extra)
        rows.append((name, frobenius_error(a, b), bound, b.double().norm().item(),
                     bool(torch.isfinite(a).all())))
    return rows
