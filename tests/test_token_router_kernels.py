"""The graph router's token-readout option (`query_weight`): Triton (interpreter on CPU) against
the reference twin and a per-token, per-expert oracle written here from the definition.

ℓ_ti = ⟨N^L_ti, W_q x_t⟩: the published GCN over the E expert nodes and the token node, whose
expert states each token reads with its own vector W_q x_t instead of the shared w_p. Every case
compares logits, probs, indices (top-K of the reference's probabilities up to rounding), weights
and the gradients of x, W_tok, W_exp, the GCN weights and W_q, flowing from all three float
outputs at once. Kernel outputs are NaN-poisoned (GMOE_POISON=1), so an unwritten element fails.
"""
import pytest
import torch

from gmoe_kernels import functional
from gmoe_kernels.activations import act
from tests.problems import gcn_op_inputs, graph_router_problem
from tests.tolerances import assert_close, assert_same_routing

TRAINABLE = ("x", "token_weight", "expert_weight", "gcn_weight", "query_weight")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("GMOE_POISON", "1")


def readout_problem(dtype=torch.float32, **kwargs):
    """A graph-router problem whose w_p is replaced by W_q (G, H), drawn like W_tok."""
    trainable, frozen, edges = graph_router_problem(dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(7)
    width, hidden = trainable["token_weight"].shape
    del trainable["score_weight"]
    query = torch.randn(width, hidden, generator=g) * hidden ** -0.5
    trainable["query_weight"] = query.to(dtype).requires_grad_(True)
    return trainable, frozen, edges


def oracle_logits(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight, query_weight,
                  activation):
    """One token at a time, one expert node at a time: the (E+1)-node GCN of DESIGN.md, the token
    node last, then ℓ_i = Σ_g N^L[i, g] (W_q x)[g]."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, a_hat = x.to(compute), adjacency.to(compute)
    num_experts = expert_features.shape[0]
    experts = act(activation, expert_features.to(compute) @ expert_weight.to(compute).t())
    rows = []
    for t in range(x.shape[0]):
        nodes = torch.cat([experts, act(activation, x[t] @ token_weight.to(compute).t())[None]])
        for w in gcn_weight.to(compute):
            nodes = act(activation, torch.stack([
                sum(a_hat[i, j] * nodes[j] for j in range(num_experts + 1)) for i in range(num_experts + 1)]) @ w.t())
        query = query_weight.to(compute) @ x[t]
        rows.append(torch.stack([(nodes[i] * query).sum() for i in range(num_experts)]))
    return torch.stack(rows)


def _oracle(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight, query_weight, top_k,
            activation):
    logits = oracle_logits(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                           query_weight, activation)
    probs = torch.softmax(logits, dim=-1)
    p_k, indices = torch.topk(probs, top_k, dim=-1)
    return logits, probs, indices, p_k / p_k.sum(-1, keepdim=True)


def _backend(name):
    def fn(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight, query_weight, top_k,
           activation):
        return functional.graph_router(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                                       None, top_k, activation, backend=name, query_weight=query_weight)
    return fn


def _run(fn, trainable, frozen, top_k, activation, cotangents, upcast=False):
    if upcast:  # the oracle runs in fp32 on fp32 copies of fp16 inputs
        trainable = {k: v.detach().float().requires_grad_(True) for k, v in trainable.items()}
        frozen = {k: v.float() for k, v in frozen.items()}
    logits, probs, indices, weights = fn(
        trainable["x"], trainable["token_weight"], trainable["expert_weight"], frozen["expert_features"],
        frozen["adjacency"], trainable["gcn_weight"], trainable["query_weight"], top_k, activation)
    c_l, c_p, c_w = cotangents
    loss = (logits * c_l).sum() + (probs * c_p).sum() + (weights * c_w.gather(1, indices)).sum()
    grads = torch.autograd.grad(loss, [trainable[k] for k in TRAINABLE])
    weights = torch.zeros_like(probs).scatter(1, indices, weights.detach())  # per (token, expert)
    return (dict(logits=logits.detach(), probs=probs.detach(), indices=indices, weights=weights),
            dict(zip(TRAINABLE, grads)))


def _check(trainable, frozen, top_k, activation, out_dtype=torch.float32):
    T, E = trainable["x"].shape[0], frozen["expert_features"].shape[0]
    g = torch.Generator().manual_seed(1)
    cot = tuple(torch.randn(T, E, generator=g).to(out_dtype) for _ in range(3))
    in_dtype = trainable["x"].dtype
    got, got_grads = _run(_backend("triton"), trainable, frozen, top_k, activation, cot)
    ref, ref_grads = _run(_backend("reference"), trainable, frozen, top_k, activation, cot)
    orc, orc_grads = _run(_oracle, trainable, frozen, top_k, activation, cot, upcast=in_dtype == torch.float16)
    for name in ("logits", "probs", "weights"):
        assert got[name].dtype == out_dtype and not got[name].isnan().any(), name
        assert_close(got[name], ref[name], dtype=out_dtype, name=f"{name} vs reference")
        assert_close(got[name], orc[name], dtype=out_dtype, name=f"{name} vs oracle")
    assert_same_routing(got["indices"], ref["probs"], ref["indices"], out_dtype, "indices vs reference")
    assert_same_routing(got["indices"], orc["probs"], orc["indices"], out_dtype, "indices vs oracle")
    for name in TRAINABLE:
        assert got_grads[name].dtype == in_dtype and not got_grads[name].isnan().any(), name
        assert_close(got_grads[name], ref_grads[name], dtype=in_dtype, name=f"d{name} vs reference")
        assert_close(got_grads[name], orc_grads[name], dtype=in_dtype, name=f"d{name} vs oracle")
    return got


# (problem kwargs, top_k, activation): which edge each covers
CASES = [
    pytest.param(dict(), 2, "silu", id="base-T20-E8-G24-partial-column-block"),
    pytest.param(dict(T=1), 2, "silu", id="T=1"),
    pytest.param(dict(E=2, T=7), 1, "silu", id="E=2-K=1"),
    pytest.param(dict(L=1, T=9), 2, "silu", id="L=1-readout-of-layer-1"),
    pytest.param(dict(L=3, G=32, T=9), 2, "gelu_tanh", id="L=3-gelu_tanh"),
    pytest.param(dict(graph="isolated", T=11), 3, "silu", id="isolated-expert"),
    pytest.param(dict(T=5, E=40, G=16), 4, "silu", id="E=40-one-token-per-tile"),
]


@pytest.mark.parametrize("kwargs,top_k,activation", CASES)
def test_token_readout_fp32(kwargs, top_k, activation):
    trainable, frozen, _ = readout_problem(**kwargs)
    _check(trainable, frozen, top_k, activation)


@pytest.mark.parametrize("kwargs,top_k,activation", CASES[:3])
def test_token_readout_fp16(kwargs, top_k, activation):
    trainable, frozen, _ = readout_problem(dtype=torch.float16, **kwargs)
    _check(trainable, frozen, top_k, activation)


def test_token_readout_fp64_matches_reference():
    trainable, frozen, _ = readout_problem(T=6, G=16, E=4, L=3, dtype=torch.float64)
    _check(trainable, frozen, 2, "silu", torch.float64)


def test_token_readout_gradcheck_fp64():
    """float64 gradcheck (fast_mode: the interpreter is slow) through the whole router, X included."""
    trainable, frozen, _ = readout_problem(T=4, H=6, G=16, E=3, L=2, dtype=torch.float64)
    features = frozen["expert_features"].clone().requires_grad_(True)

    def fn(x, token_weight, expert_weight, expert_features, gcn_weight, query_weight):
        logits, probs, _, weights = _backend("triton")(x, token_weight, expert_weight, expert_features,
                                                       frozen["adjacency"], gcn_weight, query_weight, 2, "gelu_tanh")
        return logits, probs, weights

    inputs = (trainable["x"], trainable["token_weight"], trainable["expert_weight"], features,
              trainable["gcn_weight"], trainable["query_weight"])
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, atol=1e-6, rtol=1e-5)


def test_token_readout_reference_gradcheck_fp64():
    trainable, frozen, _ = readout_problem(T=5, H=6, G=8, E=3, L=2, dtype=torch.float64)

    def fn(x, gcn_weight, query_weight):
        logits, probs, _, weights = _backend("reference")(x, trainable["token_weight"], trainable["expert_weight"],
                                                          frozen["expert_features"], frozen["adjacency"], gcn_weight,
                                                          query_weight, 2, "silu")
        return logits, probs, weights

    assert torch.autograd.gradcheck(fn, (trainable["x"], trainable["gcn_weight"], trainable["query_weight"]))


def test_token_readout_with_the_eval_constant_matches():
    """The model's eval cache passes layer 1's constant: the readout op gives the same logits."""
    trainable, frozen, _ = readout_problem(T=9)
    with torch.no_grad():
        args = ({k: v.detach() for k, v in trainable.items()}, frozen)
        constant = functional.graph_router_constant(frozen["expert_features"], args[0]["expert_weight"],
                                                    frozen["adjacency"], args[0]["gcn_weight"], "silu")
        for backend in ("reference", "triton"):
            plain = _backend(backend)(args[0]["x"], args[0]["token_weight"], args[0]["expert_weight"],
                                      frozen["expert_features"], frozen["adjacency"], args[0]["gcn_weight"],
                                      args[0]["query_weight"], 2, "silu")
            cached = functional.graph_router(args[0]["x"], args[0]["token_weight"], args[0]["expert_weight"],
                                             frozen["expert_features"], frozen["adjacency"], args[0]["gcn_weight"],
                                             None, 2, "silu", backend=backend, layer1_constant=constant,
                                             query_weight=args[0]["query_weight"])
            assert torch.equal(plain[0], cached[0]) and torch.equal(plain[2], cached[2]), backend


def test_readout_op_registration_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch of gmoe_kernels::graph_router_gcn_readout."""
    import gmoe_kernels.triton.graph_router  # noqa: F401  (registers the op)

    g, c1, token_proj, adjacency, gcn_weight = gcn_op_inputs()
    readout = torch.randn(token_proj.shape, generator=g).requires_grad_(True)
    torch.library.opcheck(torch.ops.gmoe_kernels.graph_router_gcn_readout.default,
                          (c1, token_proj, adjacency, gcn_weight, readout, "silu"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_readout_arguments_are_named(backend):
    trainable, frozen, _ = readout_problem(T=3)
    t = {k: v.detach() for k, v in trainable.items()}
    args = (t["x"], t["token_weight"], t["expert_weight"], frozen["expert_features"], frozen["adjacency"],
            t["gcn_weight"])
    with pytest.raises(ValueError, match="pass score_weight=None with query_weight"):
        functional.graph_router(*args, torch.zeros(t["gcn_weight"].shape[1]), 2, "silu", backend=backend,
                                query_weight=t["query_weight"])
    with pytest.raises(ValueError, match=r"query_weight must have shape \(24, 32\)"):
        functional.graph_router(*args, None, 2, "silu", backend=backend, query_weight=t["query_weight"].t())
