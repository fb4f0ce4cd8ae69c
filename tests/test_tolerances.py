"""The error model of the GPU checks (tests/tolerances.py: `error_bound`) on a CPU.

tests/gpu/test_kernels.py needs a GPU; its problems and runners (tests/problems.py) do not. Here they run the reference
path (and the Triton path under the interpreter, fp16 and fp32: the interpreter gets bf16
wrong) in low precision against the fp64 reference on the same rounded inputs, as the GPU
test does, and check that the model's bound holds for correct results, is not vacuous
(within 10x of the measured error), and fails results with real errors: a missing scale s,
a dropped slot, a wrong expert, GCN layers applied in the wrong order, a dropped combine slot.
"""
import dataclasses

import pytest
import torch

from benchmarks.shapes import make_routing
from gmoe_kernels import functional
from tests.problems import caster, ffn_outputs, gpu_problem, router_gpu_problem, router_outputs
from tests.tolerances import measure

LOW = [torch.bfloat16, torch.float16, torch.float32]
FFN_CASES = {  # name: (H, F, T, E, K, R, routing), each with one empty expert
    "K2_R16": (64, 160, 96, 8, 2, 16, "zipf"),
    "K8_R8": (64, 160, 96, 32, 8, 8, "zipf"),
    "K4_R2": (64, 160, 96, 16, 4, 2, "hot"),
}
INTERPRETER_CASE = (32, 48, 40, 6, 2, 8, "hot")


def ffn_rows(spec, dtype, backend="reference", wrong=None):
    """measure() rows of functional.expert_ffn in `dtype` (optionally on a wrong variant of
    the problem) against the fp64 reference of the right one."""
    H, F, T, E, K, R, routing = spec
    p = gpu_problem(H, F, T, E, K, R, dtype, routing, empty=1, device="cpu")
    _, want = ffn_outputs(p, "reference", caster(torch.float64))
    names, got = ffn_outputs(wrong(p) if wrong else p, backend, caster(dtype))
    return measure("expert_ffn", dtype, names, got, want, max(H, F, T))


def assert_within(rows, slack=10.0):
    for name, err, bound, _, finite in rows:
        assert finite and err <= bound, f"{name}: error {err:.3e} above its bound {bound:.3e}"
        assert err > bound / slack, f"{name}: error {err:.3e} far below its bound {bound:.3e} (vacuous?)"


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(FFN_CASES))
def test_expert_ffn_bound_holds_on_the_reference_path(case, dtype):
    assert_within(ffn_rows(FFN_CASES[case], dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_expert_ffn_bound_holds_on_the_triton_path(dtype, monkeypatch):
    """The kernels' own rounding points (16-bit tl.dot operands, stores) under the
    interpreter, outputs NaN-poisoned; a hot expert and an empty one."""
    monkeypatch.setenv("GMOE_POISON", "1")
    assert_within(ffn_rows(INTERPRETER_CASE, dtype, backend="triton"))


def _drop_last_slot(p):
    w = p.weights.detach().clone()
    w[:, -1] = 0.0
    return dataclasses.replace(p, weights=w.requires_grad_())


def _next_expert(p):
    # every token's experts shifted by one: still K distinct experts per token
    return dataclasses.replace(p, indices=(p.indices + 1) % p.lora["lora_a_gate"].shape[0])


WRONG = {"missing_scale_s": lambda p: dataclasses.replace(p, scaling=1.0),
         "dropped_slot": _drop_last_slot, "wrong_expert": _next_expert}


@pytest.mark.parametrize("wrong", list(WRONG))
@pytest.mark.parametrize("case", list(FFN_CASES))
def test_expert_ffn_bound_fails_real_errors(case, wrong):
    """bf16, the GPU's precision: the output leaves its bound, the LoRA gradients by > 10x.
    (d_weights of a dropped slot stay correct: the slot's weight still has its gradient.)"""
    rows = {name: (err, bound) for name, err, bound, _, _ in
            ffn_rows(FFN_CASES[case], torch.bfloat16, wrong=WRONG[wrong])}
    assert rows["y"][0] > rows["y"][1], f"y: {rows['y']}"
    for name, (err, bound) in rows.items():
        if name.startswith("d_lora"):
            assert err > 10 * bound, f"{name}: error {err:.3e}, bound {bound:.3e}"


def _router_rows(dtype, backend, wrong=False):
    H, T, E, K, G, L = 32, 24, 4, 2, 16, 2
    p = router_gpu_problem(H, T, E, K, G, L, dtype, device="cpu", name="tolerance")
    _, want, _, _ = router_outputs(p, "reference", caster(torch.float64))
    _, fp32, _, _ = router_outputs(p, "reference", caster(torch.float32))
    if wrong:  # the GCN layers in the wrong order
        p.router = dict(p.router, gcn_weight=p.router["gcn_weight"].flip(0).detach().requires_grad_())
    names, got, _, _ = router_outputs(p, backend, caster(dtype))
    return measure("router", dtype, names, got, want, max(H, G, T), fp32)


@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "reference"), (torch.float16, "triton"),
                                           (torch.float32, "triton")], ids=["bf16-reference", "fp16-triton",
                                                                            "fp32-triton"])
def test_router_bound_holds(dtype, backend, monkeypatch):
    """fp16 d_x is subnormal here (the underflow term carries it); fp32 gradients need the
    reference's measured fp32 error (the conditioning term), as at GPU shapes."""
    monkeypatch.setenv("GMOE_POISON", "1")
    for name, err, bound, _, finite in _router_rows(dtype, backend):
        assert finite and err <= bound, f"{name}: error {err:.3e} above its bound {bound:.3e}"


def test_router_bound_fails_real_errors():
    rows = _router_rows(torch.float32, "triton", wrong=True)
    for name, err, bound, _, _ in rows:
        assert err > 10 * bound, f"{name}: error {err:.3e}, bound {bound:.3e}"


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d)[6:])
def test_combine_bound(dtype):
    T, E, K, H = 64, 8, 4, 48
    indices, weights = make_routing(T, E, K, "zipf", empty=1)
    plan = functional.make_routing_plan(indices, E, backend="reference")
    rows = torch.randn(T * K, H).to(dtype)
    want = functional.combine(rows.double(), weights.double(), plan, backend="reference")
    got = functional.combine(rows, weights, plan, backend="reference")
    dropped = weights.clone()
    dropped[:, -1] = 0.0
    bad = functional.combine(rows, dropped, plan, backend="reference")
    assert_within(measure("routing", dtype, ["combine"], [got], [want], K))
    [(_, bad_err, bound, _, _)] = measure("routing", dtype, ["combine"], [bad], [want], K)
    assert bad_err > 10 * bound
