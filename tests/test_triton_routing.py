"""Triton routing ops (gmoe_kernels.triton.routing) under the interpreter, against the
reference twins: indices and plans compared exactly, every case with an empty expert,
outputs poisoned (GMOE_POISON=1) so an unwritten element fails. (top-K has one
implementation for both backends; tests/test_reference_ops.py checks it on each.)"""
import dataclasses

import pytest
import torch

from gmoe_kernels import functional, reference
from gmoe_kernels.triton import routing as triton_routing
from tests.problems import case_routing_indices
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("GMOE_POISON", "1")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    T: int
    K: int
    E: int            # experts the router chooses among
    num_experts: int  # experts in the plan (> E leaves the last ones empty)
    routing: str = "random"   # random | empty_expert | one_expert
    H: int = 24


CASES = [
    Case("random_empty_expert", T=40, K=2, E=6, num_experts=6, routing="empty_expert"),
    Case("T1", T=1, K=2, E=4, num_experts=4),
    Case("all_tokens_one_expert", T=30, K=1, E=5, num_experts=5, routing="one_expert"),
    Case("K1_empty_expert", T=33, K=1, E=4, num_experts=4, routing="empty_expert"),
    Case("K_eq_E_plus_unused_expert", T=21, K=4, E=4, num_experts=5),
    Case("multi_block_P600", T=300, K=2, E=8, num_experts=8, routing="empty_expert"),
    Case("E64_K8_odd_H25", T=32, K=8, E=64, num_experts=64, routing="empty_expert", H=25),
]


def ids(cases):
    return [c.name for c in cases]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_routing_plan_matches_reference_exactly(case):
    indices, _ = case_routing_indices(case)
    got = triton_routing.make_routing_plan(indices, case.num_experts)
    want = reference.make_routing_plan(indices, case.num_experts)
    for field in ("sorted_pairs", "expert_offsets", "inverse"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert (got.num_tokens, got.top_k, got.num_experts) == (case.T, case.K, case.num_experts)
    assert torch.equal(got.sorted_pairs[got.inverse], torch.arange(case.T * case.K))
    via_functional = functional.make_routing_plan(indices, case.num_experts, backend="triton")
    assert torch.equal(via_functional.sorted_pairs, want.sorted_pairs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_dispatch_and_combine_match_reference(case, dtype):
    indices, weights = case_routing_indices(case)
    plan = triton_routing.make_routing_plan(indices, case.num_experts)
    x = torch.randn(case.T, case.H, dtype=dtype)

    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    rows = functional.dispatch(x1, plan, backend="triton")
    rows_ref = reference.dispatch(x2, plan)
    assert rows.dtype == dtype
    assert torch.equal(rows, rows_ref)           # a gather is exact
    g_rows = torch.randn_like(rows)
    (dx,) = torch.autograd.grad(rows, x1, g_rows)
    (dx_ref,) = torch.autograd.grad(rows_ref, x2, g_rows)
    assert_close(dx, dx_ref, dtype, "d_x (dispatch)")

    r1, r2 = rows_ref.detach().clone().requires_grad_(), rows_ref.detach().clone().requires_grad_()
    w1, w2 = weights.clone().requires_grad_(), weights.clone().requires_grad_()
    out = functional.combine(r1, w1, plan, backend="triton")
    out_ref = reference.combine(r2, w2, plan)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, out_ref, dtype, "combine")
    g_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (r1, w1), g_out)
    want = torch.autograd.grad(out_ref, (r2, w2), g_out)
    assert_close(got[0], want[0], dtype, "d_rows")
    assert_close(got[1], want[1], dtype, "d_weights")


def test_combine_round_trip_is_identity_with_unit_weights():
    """dispatch then combine with weights 1/K gives x back (every pair written and read)."""
    case = Case("round_trip", T=17, K=3, E=5, num_experts=6)
    indices, _ = case_routing_indices(case)
    plan = triton_routing.make_routing_plan(indices, case.num_experts)
    x = torch.randn(case.T, 40)
    w = torch.full((case.T, case.K), 1.0 / case.K)
    out = triton_routing.combine(triton_routing.dispatch(x, plan), w, plan)
    assert_close(out, x, torch.float32)


def test_dispatch_combine_gradcheck_fp64():
    case = Case("gradcheck", T=5, K=2, E=4, num_experts=5)
    indices, weights = case_routing_indices(case)
    plan = triton_routing.make_routing_plan(indices, case.num_experts)
    x = torch.randn(case.T, 7, dtype=torch.float64, requires_grad=True)
    w = weights.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: triton_routing.combine(triton_routing.dispatch(a, plan) * 1.5, b, plan),
        (x, w), fast_mode=True)


def test_routing_errors():
    indices = torch.zeros(4, 2, dtype=torch.int64)
    plan = triton_routing.make_routing_plan(indices, 3)
    with pytest.raises(TypeError):
        triton_routing.make_routing_plan(indices.int(), 3)
    with pytest.raises(ValueError):
        triton_routing.dispatch(torch.randn(5, 8), plan)
    with pytest.raises(ValueError):
        triton_routing.combine(torch.randn(8, 8), torch.ones(4, 3), plan)


PLAN_BUILDERS = {
    "functional_triton": lambda i, e: functional.make_routing_plan(i, e, backend="triton"),
    "functional_reference": lambda i, e: functional.make_routing_plan(i, e, backend="reference"),
    "triton_direct": triton_routing.make_routing_plan,
    "reference_direct": reference.make_routing_plan,
}


@pytest.mark.parametrize("bad", [3, -1], ids=["id_eq_E", "id_minus_1"])
@pytest.mark.parametrize("build", list(PLAN_BUILDERS), ids=list(PLAN_BUILDERS))
def test_routing_plan_refuses_expert_ids_out_of_range(build, bad):
    """The plan kernels skip such ids (leaving `inverse` unwritten): every entry point refuses them."""
    indices = torch.tensor([[0, 1], [2, bad]])
    with pytest.raises((ValueError, RuntimeError), match=r"\[0, E = 3\)"):
        PLAN_BUILDERS[build](indices, 3)


@pytest.mark.parametrize("bad", [3, -1], ids=["id_eq_E", "id_minus_1"])
def test_plan_kernels_dropping_a_pair_fail_in_routing_plan(bad, monkeypatch):
    """Without the launcher's id check, the pair the kernels skip still fails RoutingPlan's
    offsets assertion, so no plan with an unwritten `inverse` slot ever leaves the launcher."""
    monkeypatch.setattr(triton_routing, "check_expert_range", lambda indices, num_experts: None)
    with pytest.raises(RuntimeError, match="dropped"):
        triton_routing.make_routing_plan(torch.tensor([[0, 1], [2, bad]]), 3)
