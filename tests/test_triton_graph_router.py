"""Triton graph router (interpreter on CPU) against the reference twin and the per-token oracle.

Every case compares logits, probs, indices (a top-K of the reference's probabilities, slot by
slot, up to rounding: see `assert_same_routing`), weights and the gradients of x,
token_weight, expert_weight, gcn_weight and score_weight, flowing from all three float
outputs at once. Kernel outputs are NaN-poisoned (GMOE_POISON=1), so an element a kernel
does not write fails the comparison. Shapes stay tiny: the interpreter runs ~5 ms per
program step. Under the interpreter G is tiled in 16-column blocks, so G=24 covers a
partial column block; T not a multiple of the tokens per tile covers a partial token tile;
the grid is 2 persistent programs, so several cases run more than one tile per program.
"""
import importlib

import pytest
import torch

from gmoe_kernels import functional
from gmoe_kernels.naive import graph_router_loop
from gmoe_kernels.reference import normalized_adjacency
from gmoe_kernels.triton._common import new_output
from tests.problems import expert_graph, gcn_op_inputs, graph_router_problem
from tests.tolerances import assert_close, assert_same_routing

triton_router = importlib.import_module("gmoe_kernels.triton.graph_router")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("GMOE_POISON", "1")


TRAINABLE = ("x", "token_weight", "expert_weight", "gcn_weight", "score_weight")


def _call(fn, trainable, frozen, top_k, activation):
    return fn(trainable["x"], trainable["token_weight"], trainable["expert_weight"],
              frozen["expert_features"], frozen["adjacency"], trainable["gcn_weight"],
              trainable["score_weight"], top_k, activation)


def _oracle(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
            score_weight, top_k, activation):
    logits = graph_router_loop(x, token_weight, expert_weight, expert_features, adjacency,
                               gcn_weight, score_weight, activation)
    probs = torch.softmax(logits, dim=-1)
    p_k, indices = torch.topk(probs, top_k, dim=-1)
    return logits, probs, indices, p_k / p_k.sum(-1, keepdim=True)


def _triton(*args):
    return functional.graph_router(*args, backend="triton")


def _reference(*args):
    return functional.graph_router(*args, backend="reference")


def _run(fn, trainable, frozen, top_k, activation, cotangents, upcast=False):
    """Outputs and gradients of sum(logits·c_l) + sum(probs·c_p) + sum(weights·c_w)."""
    if upcast:  # the oracle runs in fp32 on fp32 copies of fp16 inputs
        trainable = {k: v.detach().float().requires_grad_(True) for k, v in trainable.items()}
        frozen = {k: v.float() for k, v in frozen.items()}
    logits, probs, indices, weights = _call(fn, trainable, frozen, top_k, activation)
    c_l, c_p, c_w = cotangents
    loss = 0.0
    if c_l is not None:
        loss = loss + (logits * c_l).sum()
    if c_p is not None:
        loss = loss + (probs * c_p).sum()
    if c_w is not None:  # a cotangent per (token, expert), so near-tied slots may swap
        loss = loss + (weights * c_w.gather(1, indices)).sum()
    grads = torch.autograd.grad(loss, [trainable[k] for k in TRAINABLE])
    outs = dict(logits=logits.detach(), probs=probs.detach(), indices=indices,
                weights=weights.detach())
    return outs, dict(zip(TRAINABLE, grads))


def _check(trainable, frozen, top_k, activation, out_dtype, cotangent_kinds=("l", "p", "w")):
    T, E = trainable["x"].shape[0], frozen["expert_features"].shape[0]
    g = torch.Generator().manual_seed(1)
    cot = tuple(torch.randn(*shape, generator=g).to(out_dtype) if kind in cotangent_kinds
                else None for kind, shape in (("l", (T, E)), ("p", (T, E)), ("w", (T, E))))
    in_dtype = trainable["x"].dtype
    got, got_grads = _run(_triton, trainable, frozen, top_k, activation, cot)
    ref, ref_grads = _run(_reference, trainable, frozen, top_k, activation, cot)
    orc, orc_grads = _run(_oracle, trainable, frozen, top_k, activation, cot,
                          upcast=in_dtype == torch.float16)

    for outs in (got, ref, orc):  # weights per (token, expert): the slot order of near-ties is free
        outs["weights"] = torch.zeros(T, E, dtype=outs["weights"].dtype).scatter(1, outs["indices"], outs["weights"])
    for name in ("logits", "probs", "weights"):
        assert got[name].dtype == out_dtype, name
        assert not got[name].isnan().any(), f"{name}: unwritten (NaN-poisoned) elements"
        # Outputs are computed in fp32 (fp64) from the same input values on every path.
        assert_close(got[name], ref[name], dtype=out_dtype, name=f"{name} vs reference")
        assert_close(got[name], orc[name], dtype=out_dtype, name=f"{name} vs oracle")
    assert got["indices"].dtype == torch.int64
    torch.testing.assert_close(got["indices"], torch.topk(got["probs"], top_k, dim=-1).indices,
                               atol=0, rtol=0)
    assert_same_routing(got["indices"], ref["probs"], ref["indices"], out_dtype, "indices vs reference")
    assert_same_routing(got["indices"], orc["probs"], orc["indices"], out_dtype, "indices vs oracle")
    for name in TRAINABLE:
        assert got_grads[name].dtype == in_dtype, name
        assert_close(got_grads[name], ref_grads[name], dtype=in_dtype, name=f"d{name} vs reference")
        assert_close(got_grads[name], orc_grads[name], dtype=in_dtype, name=f"d{name} vs oracle")
    return got


# (problem kwargs, top_k, activation)
CASES = [
    pytest.param(dict(), 2, "silu", id="base-T20-E8-G24-L2-silu"),
    pytest.param(dict(T=1), 2, "silu", id="T=1"),
    pytest.param(dict(E=2), 1, "silu", id="E=2-K=1"),
    pytest.param(dict(E=4), 4, "silu", id="K=E"),
    pytest.param(dict(graph="isolated"), 3, "silu", id="isolated-expert"),
    pytest.param(dict(graph="complete"), 2, "silu", id="fully-connected"),
    pytest.param(dict(L=1), 2, "silu", id="L=1"),
    pytest.param(dict(L=3, G=32), 2, "silu", id="L=3"),
    pytest.param(dict(), 2, "gelu_tanh", id="gelu_tanh"),
    pytest.param(dict(L=3, T=9), 2, "gelu_tanh", id="gelu_tanh-L=3"),
]
EXTRA_FP32_CASES = [
    pytest.param(dict(T=13), 2, "gelu", id="gelu"),
    pytest.param(dict(T=13), 2, "relu", id="relu"),
    pytest.param(dict(T=5, E=40, G=16), 4, "silu", id="E=40-128-row-tiles"),
    pytest.param(dict(T=11, noncontiguous=True), 2, "silu", id="noncontiguous-gcn_weight"),
    pytest.param(dict(T=11, L=3, asymmetric=True), 2, "silu", id="asymmetric-adjacency"),
]


@pytest.mark.parametrize("kwargs,top_k,activation", CASES + EXTRA_FP32_CASES)
def test_graph_router_fp32(kwargs, top_k, activation):
    trainable, frozen, edges = graph_router_problem(dtype=torch.float32, **kwargs)
    if kwargs.get("graph") == "isolated":
        assert not edges[-1].any() and edges[:-1].any()
    _check(trainable, frozen, top_k, activation, torch.float32)


@pytest.mark.parametrize("kwargs,top_k,activation", CASES)
def test_graph_router_fp16(kwargs, top_k, activation):
    trainable, frozen, _ = graph_router_problem(dtype=torch.float16, **kwargs)
    _check(trainable, frozen, top_k, activation, torch.float32)


@pytest.mark.parametrize("cotangent_kinds", [("w",), ("l",), ("p",)],
                         ids=["grad-from-weights-only", "grad-from-logits-only",
                              "grad-from-probs-only"])
def test_graph_router_single_output_gradients(cotangent_kinds):
    trainable, frozen, _ = graph_router_problem(T=9)
    _check(trainable, frozen, 3, "silu", torch.float32, cotangent_kinds)


def test_ties_all_equal_resolved_as_torch_topk():
    """w_p = 0: every logit is exactly 0, every prob exactly 1/E: a tie across the K boundary."""
    trainable, frozen, _ = graph_router_problem(T=7, E=4, zero_score=True)
    got = _check(trainable, frozen, 2, "silu", torch.float32)
    assert (got["probs"] == 0.25).all()


def test_ties_twin_experts_resolved_as_torch_topk():
    """Experts 0 and 1 are twins with the same features: equal logits for every token."""
    trainable, frozen, _ = graph_router_problem(T=9, E=5, graph="twins", twin_features=True)
    got = _check(trainable, frozen, 1, "silu", torch.float32)
    assert torch.equal(got["probs"][:, 0], got["probs"][:, 1])


def test_gradcheck_fp64():
    """float64 gradcheck (fast_mode: the interpreter is slow) through the whole router."""
    trainable, frozen, _ = graph_router_problem(T=4, H=6, G=16, E=3, L=2, dtype=torch.float64)
    features = frozen["expert_features"].clone().requires_grad_(True)

    def fn(x, token_weight, expert_weight, expert_features, gcn_weight, score_weight):
        logits, probs, _, weights = _triton(x, token_weight, expert_weight, expert_features,
                                            frozen["adjacency"], gcn_weight, score_weight, 2,
                                            "gelu_tanh")
        return logits, probs, weights

    inputs = (trainable["x"], trainable["token_weight"], trainable["expert_weight"], features,
              trainable["gcn_weight"], trainable["score_weight"])
    atol, rtol = 1e-6, 1e-5  # finite differences, not the fp64 comparison tolerance
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, atol=atol, rtol=rtol)


def test_fp64_outputs_match_reference():
    trainable, frozen, _ = graph_router_problem(T=6, G=16, E=4, L=3, dtype=torch.float64)
    _check(trainable, frozen, 2, "silu", torch.float64)   # at the fp64 row of the table


def test_custom_op_registration_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch of gmoe_kernels::graph_router_gcn."""
    g, c1, token_proj, adjacency, gcn_weight = gcn_op_inputs()
    score_weight = torch.randn(c1.shape[1], generator=g).requires_grad_(True)
    torch.library.opcheck(torch.ops.gmoe_kernels.graph_router_gcn.default,
                          (c1, token_proj, adjacency, gcn_weight, score_weight, "silu"))


def test_op_autograd_matches_the_backward_launcher():
    """The registered op's autograd (setup_context, backward op) gives bitwise what the
    backward launcher returns for the same cotangents."""
    g = torch.Generator().manual_seed(0)
    T, G, E, L = 6, 16, 3, 2
    args = [torch.randn(E + 1, G, generator=g), torch.randn(T, G, generator=g),
            normalized_adjacency(expert_graph(E, "random", g)),
            torch.randn(L, G, G, generator=g) / 4, torch.randn(G, generator=g)]
    leaves = [a.clone().requires_grad_(i != 2) for i, a in enumerate(args)]
    logits, probs = torch.ops.gmoe_kernels.graph_router_gcn(*leaves, "silu")
    (logits.sum() + (probs * probs).sum()).backward()
    got = [leaves[i].grad for i in (0, 1, 3, 4)]
    want = triton_router.graph_router_gcn_backward(torch.ones_like(logits), 2 * probs.detach(),
                                                   probs.detach(), *args, "silu")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not got[2][0].any()  # W_1's slice: carried by torch, not the op


def test_poisoning_is_active():
    """The guard the comparisons rely on: kernel outputs start as NaN under GMOE_POISON=1."""
    assert new_output((2, 3), torch.float32, torch.device("cpu")).isnan().all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_unknown_activation_raises_like_reference(backend):
    trainable, frozen, _ = graph_router_problem(T=3)
    fn = _triton if backend == "triton" else _reference
    with pytest.raises(ValueError, match="not one of"):
        _call(fn, trainable, frozen, 2, "gelu_pytorch_tanh")


def test_empty_batch():
    trainable, frozen, _ = graph_router_problem(T=0)
    logits, probs, indices, weights = _call(_triton, trainable, frozen, 2, "silu")
    assert logits.shape == probs.shape == (0, 8) and indices.shape == weights.shape == (0, 2)


def test_routing_comparison_catches_real_routing_errors():
    """The tie-tolerant index check still fails on a clearly wrong expert or a clearly wrong order."""
    probs = torch.tensor([[0.5, 0.3, 0.2 - 1e-7, 1e-7], [0.4, 0.4 - 1e-7, 0.1, 0.1 + 1e-7]])
    ref = torch.topk(probs, 2).indices
    assert_same_routing(torch.tensor([[0, 1], [1, 0]]), probs, ref, torch.float32)  # near-tied swap: fine
    for wrong in ([[0, 2], [0, 1]], [[1, 0], [0, 1]], [[0, 0], [0, 1]]):  # wrong expert, order, repeat
        with pytest.raises(AssertionError):
            assert_same_routing(torch.tensor(wrong), probs, ref, torch.float32)
