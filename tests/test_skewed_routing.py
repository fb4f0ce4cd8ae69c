"""Skewed routings (benchmarks.shapes.make_routing: zipf popularity, one hot expert with most
tokens), each with an empty expert: the generator itself, and the expert FFN on them through
the public functional API, Triton (under the interpreter) and reference, against the
per-expert loop oracle, output and the gradient of every input, outputs NaN-poisoned."""
import pytest
import torch

from benchmarks.shapes import ROUTINGS, expert_popularity, make_routing
from gmoe_kernels import functional
from gmoe_kernels.naive import expert_ffn_loop
from tests.problems import skewed_ffn_problem
from tests.tolerances import assert_close

T, H, F, E, K, R = 40, 32, 48, 6, 2, 4
NAMES = ["x", "gate_weight", "up_weight", "down_weight", "lora_a_gate", "lora_b_gate", "lora_a_up",
         "lora_b_up", "lora_a_down", "lora_b_down"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("GMOE_POISON", "1")


@pytest.mark.parametrize("kind", ROUTINGS)
def test_make_routing_follows_the_popularity(kind):
    indices, weights = make_routing(2000, 8, 3, kind, empty=2, seed=1)
    assert indices.dtype == torch.int64 and indices.shape == (2000, 3)
    assert (indices.sort(1).values.diff(dim=1) != 0).all(), "an expert twice in one token"
    counts = torch.bincount(indices.reshape(-1), minlength=8)
    assert counts[6:].sum() == 0 and (counts[:6] > 0).all(), counts      # exactly the empty ones
    torch.testing.assert_close(weights.sum(-1), torch.ones(2000))
    assert (weights > 0).all()
    if kind == "balanced":
        assert counts[:6].max() < 1.2 * counts[:6].min(), counts
    elif kind == "zipf":   # popularity falls with the expert id
        assert (counts[:6].diff() < 0).all(), counts
    else:                  # expert 0 in nearly every token, the others alike
        assert counts[0] > 0.9 * 2000 and counts[1:6].max() < 1.2 * counts[1:6].min(), counts
    assert torch.equal(make_routing(2000, 8, 3, kind, empty=2, seed=1)[0], indices)


def test_make_routing_refuses_too_few_experts():
    with pytest.raises(ValueError, match="top_k"):
        make_routing(10, 4, 3, "zipf", empty=2)
    with pytest.raises(ValueError, match="routing"):
        expert_popularity("uniform", 4)


def _run(fn, params, indices, weights, grad_y, **kw):
    leaves = [params[n].detach().clone().requires_grad_() for n in NAMES]
    w = weights.detach().clone().requires_grad_()
    y = fn(*leaves, indices, w if fn is not expert_ffn_loop else w.to(leaves[0].dtype), 1.5, "silu", **kw)
    grads = torch.autograd.grad((y.float() * grad_y).sum(), leaves + [w])
    return [y, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["zipf", "hot"])
def test_expert_ffn_on_skewed_routing_matches_loop_oracle(kind, backend, dtype):
    params, indices, weights = skewed_ffn_problem(kind, dtype, T, H, F, E, K, R)
    counts = torch.bincount(indices.reshape(-1), minlength=E)
    assert counts[-1] == 0 and (kind != "hot" or counts[0] > T // 2), counts
    grad_y = torch.randn(T, H)
    got = _run(functional.expert_ffn, params, indices, weights, grad_y, backend=backend)
    want = _run(expert_ffn_loop, {k: v.float() for k, v in params.items()}, indices, weights, grad_y)
    for name, a, b in zip(["y"] + [f"d_{n}" for n in NAMES] + ["d_weights"], got, want):
        assert torch.isfinite(a).all(), f"{name}: non-finite (unwritten?) elements"
        assert_close(a.float(), b, dtype, name)
    for name in ("lora_a_gate", "lora_b_gate", "lora_a_up", "lora_b_up", "lora_a_down", "lora_b_down"):
        assert (got[1 + NAMES.index(name)][E - 1] == 0).all(), f"d_{name}: the empty expert has a gradient"


@pytest.mark.parametrize("kind", ["zipf", "hot"])
def test_expert_mix_on_skewed_routing_matches_reference(kind):
    """The fused op's own outputs (h_c, z) and gradients, Triton against the reference, fp32."""
    params, indices, weights = skewed_ffn_problem(kind, torch.float32, T, H, F, E, K, R)
    x = params["x"]
    base = [x @ params["gate_weight"].t(), x @ params["up_weight"].t()]
    lora = [params[n] for n in ("lora_a_gate", "lora_b_gate", "lora_a_up", "lora_b_up", "lora_a_down")]
    grads_out = (torch.randn(T, F), torch.randn(T, E * R))
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in [x, *base, *lora, weights]]
        outs = functional.expert_mix(*leaves[:8], indices, leaves[8], 1.5, "silu", backend=backend)
        results.append([*outs, *torch.autograd.grad(outs, leaves, grads_out)])
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.isfinite(a).all(), f"output {i}: non-finite (unwritten?) elements"
        assert_close(a, b, torch.float32, f"output {i}")
