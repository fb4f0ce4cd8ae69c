"""The reference fast path against the literal per-expert oracle: outputs and every gradient."""
import pytest
import torch

from gmoe_kernels import functional
from gmoe_kernels.naive import expert_ffn_loop, graph_router_loop
from gmoe_kernels.reference import (combine, dispatch, graph_router, make_routing_plan, router_logits,
                                    topk_route)
from tests.problems import expert_problem, router_problem
from tests.tolerances import assert_close, assert_same_routing


def python_topk(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T, K) int64: each row's K largest entries by a plain Python sort (descending, ties to
    the lower expert id), an oracle that shares nothing with torch.topk."""
    rows = probs.tolist()
    return torch.tensor([sorted(range(len(r)), key=lambda e: (-r[e], e))[:top_k] for r in rows])

EXPERT_CASES = {
    "base": dict(),
    "T=1": dict(T=1),
    "empty_expert": dict(routing="empty_expert"),
    "all_tokens_one_expert_K=1": dict(routing="one_expert", K=1),
    "K=1": dict(K=1),
    "K=E": dict(K=4, E=4),
    "R=1": dict(R=1),
    "odd_H_F": dict(H=25, F=43),
    "E=8_K=3": dict(E=8, K=3),
}


def _ffn(impl, x, frozen, lora, indices, weights, activation, scaling=0.75):
    args = (x, frozen["gate_weight"], frozen["up_weight"], frozen["down_weight"], *lora.values(),
            indices, weights, scaling, activation)
    if impl == "loop":
        return expert_ffn_loop(*args)
    return functional.expert_ffn(*args, backend="reference")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(EXPERT_CASES), ids=list(EXPERT_CASES))
def test_expert_ffn_matches_loop_oracle(case, dtype, activation):
    x, frozen, lora, indices, weights = expert_problem(dtype=dtype, **EXPERT_CASES[case])
    inputs = [x, weights, *lora.values()]
    names = ["x", "weights", *lora]
    y_fast = _ffn("fast", x, frozen, lora, indices, weights, activation)
    y_loop = _ffn("loop", x, frozen, lora, indices, weights, activation)
    assert_close(y_fast, y_loop, name="y")
    dy = torch.randn_like(y_loop)
    grads_fast = torch.autograd.grad(y_fast, inputs, dy)
    grads_loop = torch.autograd.grad(y_loop, inputs, dy, allow_unused=True)
    for name, gf, gl in zip(names, grads_fast, grads_loop):
        if gl is None:  # an expert no token chose: the loop never touches its weights
            gl = torch.zeros_like(gf)
        assert_close(gf, gl, name=f"d{name}")


def test_expert_ffn_gradcheck_fp64():
    x, frozen, lora, indices, weights = expert_problem(T=5, H=6, F=7, E=3, K=2, R=2)

    def fn(x, weights, *lora_values):
        return functional.expert_ffn(x, *frozen.values(), *lora_values, indices, weights, 0.5,
                                     "gelu_tanh", backend="reference")

    assert torch.autograd.gradcheck(fn, (x, weights, *lora.values()))


def test_expert_ffn_gradient_reaches_router_probs():
    x, frozen, lora, _, _ = expert_problem()
    probs = torch.softmax(torch.randn(x.shape[0], 4, dtype=x.dtype), -1).requires_grad_()
    indices, weights = topk_route(probs, 2)
    y = _ffn("fast", x, frozen, lora, indices, weights, "silu")
    (grad,) = torch.autograd.grad(y.sum(), probs)
    assert grad.abs().sum() > 0


def test_expert_ffn_fp16_matches_fp32():
    x, frozen, lora, indices, weights = expert_problem(dtype=torch.float32, requires_grad=False)
    y32 = _ffn("fast", x, frozen, lora, indices, weights, "silu")
    half = lambda d: {k: v.half() for k, v in d.items()}  # noqa: E731
    y16 = _ffn("fast", x.half(), half(frozen), half(lora), indices, weights, "silu")
    assert y16.dtype == torch.float16
    assert_close(y16, y32.half(), name="y fp16")


ROUTER_CASES = {
    "base": dict(),
    "T=1": dict(T=1),
    "E=2": dict(E=2, K=1, edges=()),
    "K=E": dict(K=4),
    "isolated_expert": dict(edges=((0, 1), (1, 2))),  # expert 3 has no expert neighbour
    "fully_connected": dict(edges=((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))),
    "L=1": dict(L=1),
    "L=3": dict(L=3),
}


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("case", list(ROUTER_CASES), ids=list(ROUTER_CASES))
def test_graph_router_matches_per_token_oracle(case, activation):
    kw = dict(ROUTER_CASES[case])
    top_k = kw.pop("K", 2)
    p = router_problem(**kw)
    logits, probs, indices, weights = graph_router(**p, top_k=top_k, activation=activation)
    oracle = graph_router_loop(**p, activation=activation)
    assert_close(logits, oracle, name="logits")
    oracle_probs = torch.softmax(oracle, -1)
    assert_same_routing(indices, oracle_probs, python_topk(oracle_probs, top_k), torch.float64)
    params = ["x", "token_weight", "expert_weight", "gcn_weight", "score_weight"]
    d = torch.randn_like(logits)
    g_fast = torch.autograd.grad(logits, [p[n] for n in params], d)
    g_oracle = torch.autograd.grad(oracle, [p[n] for n in params], d)
    for name, a, b in zip(params, g_fast, g_oracle):
        assert_close(a, b, name=f"d{name}")


def test_graph_router_gradcheck_fp64():
    p = router_problem(T=3, H=5, G=4, E=3, L=2, edges=((0, 1),))
    names = ["x", "token_weight", "expert_weight", "gcn_weight", "score_weight"]

    def fn(*tensors):
        args = dict(p, **dict(zip(names, tensors)))
        return router_logits(**args, activation="silu")

    assert torch.autograd.gradcheck(fn, tuple(p[n] for n in names))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("top_k", [1, 2, 4, 6])
def test_topk_route_chooses_the_k_largest(top_k, backend):
    """Against independent computations: the chosen probabilities are the K largest (every
    chosen p >= every unchosen p, in descending order, K distinct experts, a top-K of the
    Python sort even where rows tie), and the weights are p_k / sum_k p_k summed by hand."""
    probs = torch.softmax(torch.randn(23, 6, dtype=torch.float64), -1)
    probs[:3] = 1.0 / 6                                  # whole rows of ties
    probs[3:6, 1] = probs[3:6, 4] = 0.3                  # a tie inside a row
    probs[6:9, 2] = 0.0                                  # an expert these rows never need
    indices, weights = functional.topk_route(probs, top_k, backend=backend)
    assert indices.dtype == torch.int64 and indices.shape == (23, top_k)
    assert weights.dtype == torch.float64 and weights.shape == (23, top_k)
    assert (indices.sort(1).values.diff(dim=1) != 0).all(), "an expert chosen twice"
    chosen = probs.gather(1, indices)
    assert (chosen.diff(dim=1) <= 0).all(), "slots not in descending probability"
    if top_k < probs.shape[1]:
        unchosen = probs.scatter(1, indices, -1.0).max(1).values
        assert (chosen.min(1).values >= unchosen).all(), "a larger probability was left out"
    assert_same_routing(indices, probs, python_topk(probs, top_k), torch.float64)
    by_hand = [[probs[t, e].item() / sum(probs[t, j].item() for j in row) for e in row]
               for t, row in enumerate(indices.tolist())]
    torch.testing.assert_close(weights, torch.tensor(by_hand, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_route_weights_are_fp32(dtype, backend):
    probs = torch.softmax(torch.randn(5, 4), -1).to(dtype)
    indices, weights = functional.topk_route(probs, 2, backend=backend)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    assert (probs.float().gather(1, indices)[:, 0] == probs.float().max(1).values).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_topk_route_weights_gradcheck_fp64(backend):
    """d weights / d probs against finite differences (distinct probabilities: the
    selection stays put under gradcheck's perturbation)."""
    probs = torch.softmax(torch.randn(7, 5, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: functional.topk_route(p, 3, backend=backend)[1], (probs,))


@pytest.mark.parametrize("T,E,K", [(1, 3, 1), (10, 4, 2), (7, 4, 4), (16, 8, 3)], ids=["T=1", "base", "K=E", "E=8"])
def test_routing_plan_dispatch_combine(T, E, K):
    scores = torch.randn(T, E)
    scores[:, E - 1] = -1e9  # always an empty expert (when K < E)
    indices = torch.topk(scores, K).indices
    plan = make_routing_plan(indices, E)
    counts = torch.bincount(indices.reshape(-1), minlength=E)
    assert torch.equal(plan.expert_counts(), counts)
    flat = indices.reshape(-1)
    assert torch.equal(flat[plan.sorted_pairs], torch.sort(flat, stable=True).values)
    assert torch.equal(plan.sorted_pairs[plan.inverse], torch.arange(T * K))
    x = torch.randn(T, 6)
    rows = dispatch(x, plan)
    assert torch.equal(rows, x[plan.sorted_pairs // K])
    weights = torch.rand(T, K)
    expected = (x[:, None, :] * weights[..., None]).sum(1)
    assert_close(combine(rows, weights, plan), expected, name="combine")


def test_routing_plan_rejects_wrong_dtype():
    from gmoe_kernels import RoutingPlan
    with pytest.raises(TypeError, match="int64"):
        RoutingPlan(torch.zeros(2, dtype=torch.int32), torch.zeros(3, dtype=torch.int64),
                    torch.zeros(2, dtype=torch.int64), 2, 1, 2)


def test_routing_plan_refuses_offsets_that_drop_a_pair(monkeypatch):
    """expert_offsets must run from 0 to T·K: anything else means a pair was never placed."""
    from gmoe_kernels import RoutingPlan
    pairs = torch.arange(4)                               # T 2, K 2, E 2
    RoutingPlan(pairs, torch.tensor([0, 2, 4]), pairs, 2, 2, 2)
    for bad in ([0, 2, 3], [1, 2, 4], [0, 0, 0]):
        with pytest.raises(RuntimeError, match="dropped"):
            RoutingPlan(pairs, torch.tensor(bad), pairs, 2, 2, 2)
    empty = torch.zeros(0, dtype=torch.int64)             # P == 0: no pair to drop
    RoutingPlan(empty, torch.zeros(3, dtype=torch.int64), empty, 0, 2, 2)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)   # not checked while tracing
    RoutingPlan(pairs, torch.tensor([0, 2, 3]), pairs, 2, 2, 2)


def test_backend_selection(monkeypatch):
    from gmoe_kernels.backend import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="not a backend"):
        resolve_backend("cuda", torch.device("cpu"))
    monkeypatch.setenv("GMOE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GMOE_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.setenv("GMOE_BACKEND", "reference")
    assert resolve_backend("triton", torch.device("cpu")) == "reference"


def test_repeated_expert_in_one_token_counts_twice():
    """Not from top-k, but a caller may pass it: both slots contribute, as in the per-pair maths."""
    x, frozen, lora, indices, weights = expert_problem(T=6, E=4, K=2)
    indices = indices.clone()
    indices[:, 1] = indices[:, 0]
    y_fast = _ffn("fast", x, frozen, lora, indices, weights, "silu")
    y_loop = _ffn("loop", x, frozen, lora, indices, weights, "silu")
    assert_close(y_fast, y_loop, name="y")
    inputs = [x, weights, *lora.values()]
    for a, b in zip(torch.autograd.grad(y_fast.sum(), inputs),
                    torch.autograd.grad(y_loop.sum(), inputs, allow_unused=True)):
        assert_close(a, torch.zeros_like(a) if b is None else b, name="grad")
