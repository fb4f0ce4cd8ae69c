"""GPU correctness of the Triton kernels at real shapes (run by benchmarks/gpu_check.sh).

  TRITON_INTERPRET=0 pytest tests/gpu/test_kernels.py -m gpu -q   # on a CUDA machine; skipped elsewhere

The expert FFN and the graph router with backend="triton", in bf16, fp16 and fp32, against
the reference twin run in fp64 on the same (rounded) inputs: the output and the gradient of
every input, each within its own bound from the error model in tests/tolerances.py
(`measure`, `error_bound`: roundings on the path, fp32 accumulation, fp16 underflow and, for the
router, its measured fp32 conditioning); reported as ||got - want|| / ||want|| beside that
bound relative to ||want||. FFN cases include skewed routings (benchmarks.shapes.make_routing:
zipf, one hot expert) and an empty expert. Kernel outputs are NaN-poisoned (GMOE_POISON=1),
so an element a kernel never writes fails. Router indices must agree exactly but for
near-ties (a tiny fraction of tokens). With GMOE_GPU_REPORT=<file>, every comparison is
appended there as one JSON line (gpu_check.sh summarises it). The problems and their runners
are tests/problems.py's (`gpu_problem`, `ffn_outputs`, `router_outputs`); tests/test_tolerances.py
runs them on the CPU reference path to check the error model.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import contenders
from benchmarks.shapes import make_routing
from gmoe_kernels import functional
from tests.problems import caster, ffn_outputs, gpu_problem, router_gpu_problem, router_outputs
from tests.tolerances import measure

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Near-ties may order differently in low precision: at most this fraction of tokens differ.
INDEX_MISMATCH = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 5e-3}

FFN_CASES = {   # name: (H, F, T, E, K, R, routing, empty experts)
    "llama3-8b-E8K2R8-T2048": (4096, 14336, 2048, 8, 2, 8, "balanced", 0),
    "qwen2-7b-E32K8R16-T1000": (3584, 18944, 1000, 32, 8, 16, "balanced", 0),
    "medium-E16K4R2-T4097-empty": (1024, 2816, 4097, 16, 4, 2, "balanced", 1),
    "medium-E16K4R8-T4096-zipf-empty": (1024, 2816, 4096, 16, 4, 8, "zipf", 1),
    "medium-E8K2R16-T4096-hot": (1024, 2816, 4096, 8, 2, 16, "hot", 0),
}
ROUTER_CASES = {  # name: (H, T, E, K, G, L)
    "llama3-8b-E8K2-T4096": (4096, 4096, 8, 2, 256, 2),
    "qwen2-7b-E32K8-T3001-L3": (3584, 3001, 32, 8, 256, 3),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("GMOE_POISON", "1")
    monkeypatch.delenv("GMOE_BACKEND", raising=False)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: these tests are for the real GPU kernels")


def _record(**entry):
    path = os.environ.get("GMOE_GPU_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


def _check(case, dtype, rows):
    failures = []
    for name, err, bound, norm, finite in rows:
        rel, tol = err / max(norm, 1e-30), bound / max(norm, 1e-30)
        ok = finite and err <= bound
        _record(case=case, dtype=str(dtype)[6:], tensor=name, rel_err=rel, tol=tol, finite=finite, ok=ok)
        if not ok:
            failures.append(f"{name}: rel err {rel:.2e} (tol {tol:.1e}){'' if finite else ', non-finite'}")
    assert not failures, f"{case} {dtype}: " + "; ".join(failures)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", list(FFN_CASES))
def test_expert_ffn_triton_matches_reference(name, dtype):
    why = contenders.triton_missing("expert_mix", torch.device("cuda"))
    if why:
        pytest.skip(why)
    H, F, T, E, K, R, routing, empty = FFN_CASES[name]
    p = gpu_problem(H, F, T, E, K, R, dtype, routing, empty)
    names, got = ffn_outputs(p, "triton", caster(dtype))
    _, want = ffn_outputs(p, "reference", caster(torch.float64))
    _check(name, dtype, measure("expert_ffn", dtype, names, got, want, max(H, F, T)))


@pytest.mark.parametrize("mode", ["gather", "dot", "grouped"])
@pytest.mark.parametrize("name", list(FFN_CASES)[:2])
def test_expert_ffn_each_token_kernel_variant_bf16(name, mode, monkeypatch):
    """Every token-kernel variant (GMOE_EXPAND), whichever one `auto` would pick, in bf16."""
    why = contenders.triton_missing("expert_mix", torch.device("cuda"))
    if why:
        pytest.skip(why)
    monkeypatch.setenv("GMOE_EXPAND", mode)
    H, F, T, E, K, R, routing, empty = FFN_CASES[name]
    p = gpu_problem(H, F, T, E, K, R, torch.bfloat16, routing, empty)
    names, got = ffn_outputs(p, "triton", caster(torch.bfloat16))
    _, want = ffn_outputs(p, "reference", caster(torch.float64))
    _check(f"{name}-{mode}", torch.bfloat16, measure("expert_ffn", torch.bfloat16, names, got, want, max(H, F, T)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", list(ROUTER_CASES))
def test_graph_router_triton_matches_reference(name, dtype):
    why = contenders.triton_missing("graph_router", torch.device("cuda"))
    if why:
        pytest.skip(why)
    H, T, E, K, G, L = ROUTER_CASES[name]
    p = router_gpu_problem(H, T, E, K, G, L, dtype)
    names, got, idx_got, w_got = router_outputs(p, "triton", caster(dtype))
    _, want, idx_want, w_want = router_outputs(p, "reference", caster(torch.float64))
    _, fp32, idx_fp32, w_fp32 = router_outputs(p, "reference", caster(torch.float32))   # its conditioning
    assert torch.isfinite(w_got).all() and (idx_got >= 0).all() and (idx_got < E).all(), "unwritten routing"
    same = (idx_got == idx_want).all(dim=1)
    mismatch = 1.0 - same.float().mean().item()
    _record(case=name, dtype=str(dtype)[6:], tensor="indices", mismatch=mismatch, ok=mismatch <= INDEX_MISMATCH[dtype])
    assert mismatch <= INDEX_MISMATCH[dtype], f"{name} {dtype}: {mismatch:.2%} of tokens chose other experts"
    same &= (idx_fp32 == idx_want).all(dim=1)
    names.append("weights")   # compared on the tokens whose indices agree
    got.append(w_got[same])
    want.append(w_want[same])
    fp32.append(w_fp32[same])
    _check(name, dtype, measure("router", dtype, names, got, want, max(H, G, T), fp32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_routing_triton_matches_reference(dtype):
    """make_routing_plan, dispatch and combine at T 8192, E 32 (one empty), K 8, H 4096, for a
    balanced and a hot-expert routing; top-K's choice checked on its own (K largest, in order)."""
    why = contenders.triton_missing("make_routing_plan", torch.device("cuda"))
    if why:
        pytest.skip(why)
    T, E, K, H = 8192, 32, 8, 4096
    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(T, E, generator=gen), -1).cuda()
    x = torch.randn(T, H, generator=gen).to("cuda", dtype)
    name = f"routing-T{T}-E{E}-K{K}"

    idx, _ = functional.topk_route(probs, K, backend="triton")
    chosen = probs.gather(1, idx)
    ok = bool((chosen.min(1).values >= probs.scatter(1, idx, -1.0).max(1).values).all()
              and (chosen.diff(dim=1) <= 0).all())
    _record(case=name, dtype=str(dtype)[6:], tensor="topk choice", mismatch=0.0 if ok else 1.0, ok=ok)
    assert ok, "topk_route: not the K largest probabilities in descending order"
    for routing in ("balanced", "hot"):
        indices, weights = make_routing(T, E, K, routing, empty=1, seed=5, device="cuda")
        plan_t = functional.make_routing_plan(indices, E, backend="triton")
        plan_r = functional.make_routing_plan(indices, E, backend="reference")
        for field in ("sorted_pairs", "expert_offsets", "inverse"):
            same = bool(torch.equal(getattr(plan_t, field), getattr(plan_r, field)))
            _record(case=f"{name}-{routing}", dtype=str(dtype)[6:], tensor=f"plan.{field}",
                    mismatch=0.0 if same else 1.0, ok=same)
            assert same, f"make_routing_plan ({routing}): {field} differs from the reference"
        rows_t = functional.dispatch(x, plan_r, backend="triton")
        rows_r = functional.dispatch(x, plan_r, backend="reference")
        assert torch.equal(rows_t, rows_r), "dispatch: rows differ (it is a copy: must be exact)"
        rows = torch.randn(T * K, H, generator=gen).to("cuda", dtype)   # distinct per slot, unlike x's
        combined_t = functional.combine(rows, weights, plan_r, backend="triton")
        combined_r = functional.combine(rows.double(), weights.double(), plan_r, backend="reference")
        _check(f"{name}-{routing}", dtype, measure("routing", dtype, ["combine"], [combined_t], [combined_r], K))
