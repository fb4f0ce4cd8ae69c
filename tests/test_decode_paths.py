"""The small-batch (decoding) paths against the reference: the gathered expert mix (no routing
plan), the per-expert down LoRA, and which path the dispatch takes.

Each case says which edge it covers; tolerances from tests/tolerances.py; indices exact.
"""
import pytest
import torch

from gmoe_kernels import functional, small_batch
from gmoe_kernels.reference import expert_mix as reference_mix
from gmoe_kernels.reference.expert_mix_gathered import expert_mix_gathered
from tests.problems import expert_problem
from tests.tolerances import assert_close

MIX_KEYS = ("lora_a_gate", "lora_b_gate", "lora_a_up", "lora_b_up", "lora_a_down")

CASES = {
    "one token (decoding at batch 1)": dict(T=1, K=2),
    "eight tokens (decoding at batch 8)": dict(T=8, K=2),
    "top-1": dict(T=3, K=1),
    "K = E: every expert on every token": dict(T=4, K=4),
    "an expert nobody chose": dict(T=5, K=2, routing="empty_expert"),
    "every token on the same experts": dict(T=6, K=2, routing="one_expert"),
}


def _inputs(dtype, T, K, routing="random", R=3):
    x, frozen, lora, indices, weights = expert_problem(T=T, H=10, F=14, E=4, K=K, R=R, dtype=dtype, routing=routing)
    gate_base = (x @ frozen["gate_weight"].t()).detach().requires_grad_()
    up_base = (x @ frozen["up_weight"].t()).detach().requires_grad_()
    return (x, gate_base, up_base, *(lora[k] for k in MIX_KEYS), indices, weights, 1.5, "silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES)
def test_gathered_mix_matches_the_reference_forward_and_backward(case, dtype):
    inputs = _inputs(dtype, **CASES[case])
    want = reference_mix(*inputs)
    got = expert_mix_gathered(*inputs)
    for name, a, b in zip(("h_c", "z"), got, want):
        assert_close(a, b, name=name)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    upstream = [torch.randn_like(t) for t in want]
    grads = torch.autograd.grad(got, leaves, upstream)
    grads_ref = torch.autograd.grad(want, leaves, upstream)
    names = ("x", "gate_base", "up_base", *MIX_KEYS, "weights")
    for name, a, b in zip(names, grads, grads_ref):
        assert_close(a, b, name=f"d{name}")


def test_gathered_mix_adds_a_repeated_expert_twice():
    """A caller's indices may list one expert in two slots (top-k never does): both count."""
    x, g, u, a_g, b_g, a_u, b_u, a_d, _, weights, s, act = _inputs(torch.float64, T=2, K=2)
    indices = torch.tensor([[1, 1], [0, 3]])
    for a, b in zip(expert_mix_gathered(x, g, u, a_g, b_g, a_u, b_u, a_d, indices, weights, s, act),
                    reference_mix(x, g, u, a_g, b_g, a_u, b_u, a_d, indices, weights, s, act)):
        assert_close(a, b)


def test_gathered_mix_gradcheck():
    inputs = _inputs(torch.float64, T=2, K=2, R=2)
    assert torch.autograd.gradcheck(lambda *t: expert_mix_gathered(*t, *inputs[10:]), inputs[:10], fast_mode=True)


@pytest.mark.parametrize("tokens", [1, 2, 7], ids=["T1", "T2", "T7-below-R"])
def test_down_lora_for_few_tokens_matches_the_stacked_gemm(tokens):
    """Below R tokens the down LoRA is E per-expert products: the same sums, another order."""
    z = torch.randn(tokens, 4 * 8, dtype=torch.float64, requires_grad=True)
    b_down = torch.randn(4, 10, 8, dtype=torch.float64, requires_grad=True)
    got = functional.stacked_down_lora(z, b_down, 1.5)
    want = 1.5 * (z @ b_down.permute(1, 0, 2).reshape(10, 32).t())
    assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), [z, b_down]), torch.autograd.grad(want.sum(), [z, b_down])):
        assert_close(a, b)


def test_dispatch_takes_the_gathered_path_only_for_few_tokens_without_autograd(monkeypatch):
    calls = []
    real = functional.expert_mix_gathered
    monkeypatch.setattr(functional, "expert_mix_gathered", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    limit = small_batch.MAX_TOKENS["reference"]
    assert limit >= 1
    few, many = _inputs(torch.float32, T=limit, K=2), _inputs(torch.float32, T=limit + 1, K=2)
    with torch.no_grad():
        functional.expert_mix(*few, backend="reference")
        functional.expert_mix(*many, backend="reference")
    functional.expert_mix(*few, backend="reference")          # autograd records: the plan path
    assert calls == [limit]
    with small_batch.forced_path("gathered"):
        functional.expert_mix(*many, backend="reference")
    with torch.no_grad(), small_batch.forced_path("plan"):
        functional.expert_mix(*few, backend="reference")
    assert calls == [limit, limit + 1]
    assert not small_batch.use_gathered(1, "triton", recording=False) or small_batch.MAX_TOKENS["triton"] >= 1
    with pytest.raises(ValueError, match="path='fast'.*plan"):
        with small_batch.forced_path("fast"):
            pass


def test_gathered_dispatch_agrees_with_the_plan_path():
    inputs = _inputs(torch.float32, T=3, K=2)
    with torch.no_grad():
        got = functional.expert_mix(*inputs, backend="reference")
        with small_batch.forced_path("plan"):
            want = functional.expert_mix(*inputs, backend="reference")
    for a, b in zip(got, want):
        assert_close(a, b)


def test_gathered_path_names_an_expert_id_out_of_range():
    """The decoding path checks ids with one host read (CPU), with the same clear error."""
    inputs = list(_inputs(torch.float32, T=2, K=2))
    inputs[8] = torch.tensor([[0, 4], [1, 2]])   # E = 4
    with torch.no_grad(), pytest.raises(ValueError, match=r"expert ids in \[0, 4\].*E = 4"):
        functional.expert_mix(*inputs, backend="reference")


def test_small_batch_benchmark_times_every_path_and_checks_them(tmp_path):
    """benchmarks/small_batch.py (layer mode, tiny sizes): every path timed, each compared with the plan path."""
    import json

    from benchmarks import small_batch as bench

    out = tmp_path / "rows.json"
    assert bench.main(["--hidden", "16", "--inter", "24", "--experts", "4", "--rank", "2", "--tokens", "1,3",
                       "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [1, 3]
    for row in rows:
        assert all(row[f"{path}_ms"] > 0 for path in small_batch.PATHS)
        assert row["gathered_max_abs_diff"] < 1e-4 and row["fastest"] in small_batch.PATHS
