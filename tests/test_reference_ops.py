"""The reference fast path against the literal per-expert oracle: outputs and every gradient."""
import pytest
import torch

from gmoe_kernels import functional
from gmoe_kernels.reference import (combine, dispatch, expert_ffn_loop, graph_router,
                                    graph_router_loop, make_routing_plan, router_logits, topk_route)
from tests.helpers import expert_problem, router_problem
from tests.tolerances import assert_close

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
    assert torch.equal(indices, torch.topk(torch.softmax(oracle, -1), top_k).indices)
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


def test_topk_ties_follow_torch_topk():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1]])
    indices, weights = topk_route(probs, 2)
    assert torch.equal(indices, torch.topk(probs, 2).indices)
    assert torch.allclose(weights.sum(-1), torch.ones(2))


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
