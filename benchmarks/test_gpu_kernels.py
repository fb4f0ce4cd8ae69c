"""GPU correctness of the Triton kernels at real shapes (run by benchmarks/gpu_check.sh).

  pytest benchmarks/test_gpu_kernels.py -q      # on a CUDA machine; skipped elsewhere

The expert FFN and the graph router with backend="triton", in bf16, fp16 and fp32, against
the reference twin run in fp64 on the same (rounded) inputs: the output and the gradient of
every input, by relative error ||got - want|| / ||want||. Kernel outputs are NaN-poisoned
(GMOE_POISON=1), so an element a kernel never writes fails. Router indices must agree
exactly but for near-ties (a tiny fraction of tokens). With GMOE_GPU_REPORT=<file>, every
comparison is appended there as one JSON line (gpu_check.sh summarises it).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import contenders as C
from benchmarks.shapes import Case, Shape, Variant
from gmoe_kernels import functional

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Relative (Frobenius) error allowed against the fp64 reference. fp32 leaves room for TF32 dots.
TOLERANCE = {torch.float32: 5e-3, torch.float16: 1.5e-2, torch.bfloat16: 4e-2}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Near-ties may order differently in low precision: at most this fraction of tokens differ.
INDEX_MISMATCH = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 5e-3}

FFN_CASES = {   # name: (H, F, T, E, K, R, empty expert?)
    "llama3-8b-E8K2R8-T2048": (4096, 14336, 2048, 8, 2, 8, False),
    "qwen2-7b-E32K8R16-T1000": (3584, 18944, 1000, 32, 8, 16, False),
    "medium-E16K4R2-T4097-empty": (1024, 2816, 4097, 16, 4, 2, True),
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


def _compare(case, dtype, names, got, want):
    failures = []
    for name, a, b in zip(names, got, want, strict=True):
        finite = bool(torch.isfinite(a).all())
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        ok = finite and err <= TOLERANCE[dtype]
        _record(case=case, dtype=str(dtype)[6:], tensor=name, rel_err=err, finite=finite, ok=ok)
        if not ok:
            failures.append(f"{name}: rel err {err:.2e} (tol {TOLERANCE[dtype]:.0e}){'' if finite else ', non-finite'}")
    assert not failures, f"{case} {dtype}: " + "; ".join(failures)


def _problem(H, F, T, E, K, R, dtype, empty=False, device="cuda"):
    shape = Shape("gpu-check", H, F, T, (Variant(E, K, R),))
    p = C.make_problem(Case(shape, shape.variants[0]), torch.device(device), dtype)
    if empty:  # route nobody to expert 3: the kernels must still write every output
        with torch.no_grad():
            probs = torch.softmax((p.x @ p.linear_weight.t()).float(), -1)
            probs[:, 3] = 0
            indices, weights = functional.topk_route(probs, K, backend="reference")
        p.indices, p.weights = indices, weights.requires_grad_(True)
    return p


def _ffn(p, backend, cast):
    leaves = {"x": cast(p.x), "weights": cast(p.weights, keep=torch.float32),
              **{k: cast(v) for k, v in p.lora.items()}}
    frozen = {k: cast(v, grad=False) for k, v in p.frozen.items()}
    rest = {k: v for k, v in leaves.items() if k not in ("x", "weights")}
    y = functional.expert_ffn(leaves["x"], **frozen, **rest, indices=p.indices, weights=leaves["weights"],
                              scaling=p.scaling, activation=p.activation, backend=backend)
    grads = torch.autograd.grad(y, list(leaves.values()), p.dy.to(y.dtype))
    return ["y", *[f"d_{k}" for k in leaves]], [y, *grads]


def _caster(dtype):
    def cast(t, grad=True, keep=None):
        target = keep if (keep is not None and dtype != torch.float64) else dtype
        return t.detach().to(target).requires_grad_(grad and t.requires_grad)
    return cast


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", list(FFN_CASES))
def test_expert_ffn_triton_matches_reference(name, dtype):
    why = C.triton_missing("expert_mix", torch.device("cuda"))
    if why:
        pytest.skip(why)
    H, F, T, E, K, R, empty = FFN_CASES[name]
    p = _problem(H, F, T, E, K, R, dtype, empty)
    names, got = _ffn(p, "triton", _caster(dtype))
    _, want = _ffn(p, "reference", _caster(torch.float64))
    _compare(name, dtype, names, got, want)


@pytest.mark.parametrize("mode", ["gather", "dot"])
@pytest.mark.parametrize("name", list(FFN_CASES)[:2])
def test_expert_ffn_each_token_kernel_variant_bf16(name, mode, monkeypatch):
    """Both token-kernel variants (GMOE_EXPAND), whichever one `auto` would pick, in bf16."""
    why = C.triton_missing("expert_mix", torch.device("cuda"))
    if why:
        pytest.skip(why)
    monkeypatch.setenv("GMOE_EXPAND", mode)
    H, F, T, E, K, R, empty = FFN_CASES[name]
    p = _problem(H, F, T, E, K, R, torch.bfloat16, empty)
    names, got = _ffn(p, "triton", _caster(torch.bfloat16))
    _, want = _ffn(p, "reference", _caster(torch.float64))
    _compare(f"{name}-{mode}", torch.bfloat16, names, got, want)


def _router(p, backend, cast):
    r = p.router
    leaves = {"x": cast(p.x), "token_weight": cast(r["token_weight"]), "expert_weight": cast(r["expert_weight"]),
              "gcn_weight": cast(r["gcn_weight"]), "score_weight": cast(r["score_weight"])}
    features = cast(r["expert_features"], grad=False)
    logits, probs, indices, weights = functional.graph_router(
        leaves["x"], leaves["token_weight"], leaves["expert_weight"], features, r["adjacency"],
        leaves["gcn_weight"], leaves["score_weight"], p.case.variant.top_k, p.activation, backend=backend)
    gp = torch.randn(probs.shape, generator=torch.Generator().manual_seed(3)).to(probs)
    grads = torch.autograd.grad((probs * gp).sum(), list(leaves.values()))
    return ["logits", "probs", *[f"d_{k}" for k in leaves]], [logits, probs, *grads], indices, weights


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", list(ROUTER_CASES))
def test_graph_router_triton_matches_reference(name, dtype):
    why = C.triton_missing("graph_router", torch.device("cuda"))
    if why:
        pytest.skip(why)
    H, T, E, K, G, L = ROUTER_CASES[name]
    shape = Shape("gpu-check", H, 64, T, (Variant(E, K, 2),), gcn_dim=G, gcn_layers=L)
    p = C.make_problem(Case(shape, shape.variants[0]), torch.device("cuda"), dtype)
    names, got, idx_got, w_got = _router(p, "triton", _caster(dtype))
    _, want, idx_want, w_want = _router(p, "reference", _caster(torch.float64))
    assert torch.isfinite(w_got).all() and (idx_got >= 0).all() and (idx_got < E).all(), "unwritten routing"
    same = (idx_got == idx_want).all(dim=1)
    mismatch = 1.0 - same.float().mean().item()
    _record(case=name, dtype=str(dtype)[6:], tensor="indices", mismatch=mismatch, ok=mismatch <= INDEX_MISMATCH[dtype])
    assert mismatch <= INDEX_MISMATCH[dtype], f"{name} {dtype}: {mismatch:.2%} of tokens chose other experts"
    names.append("weights(same indices)")
    got.append(w_got[same])
    want.append(w_want[same])
    _compare(name, dtype, names, got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_routing_triton_matches_reference(dtype):
    """topk_route, make_routing_plan, dispatch and combine at T 8192, E 32 (one empty), K 8, H 4096."""
    why = C.triton_missing("make_routing_plan", torch.device("cuda"))
    if why:
        pytest.skip(why)
    T, E, K, H = 8192, 32, 8, 4096
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(T, E, generator=gen)
    logits[:, 7] = -torch.inf                      # expert 7 empty: its slice must still be right
    probs = torch.softmax(logits, -1).cuda()
    x = torch.randn(T, H, generator=gen).to("cuda", dtype)
    name = f"routing-T{T}-E{E}-K{K}"

    idx_t, w_t = functional.topk_route(probs, K, backend="triton")
    idx_r, w_r = functional.topk_route(probs, K, backend="reference")
    exact = bool(torch.equal(idx_t, idx_r))
    _record(case=name, dtype=str(dtype)[6:], tensor="topk indices", mismatch=0.0 if exact else 1.0, ok=exact)
    assert exact, "topk_route: indices differ from the reference"
    plan_t = functional.make_routing_plan(idx_r, E, backend="triton")
    plan_r = functional.make_routing_plan(idx_r, E, backend="reference")
    for field in ("sorted_pairs", "expert_offsets", "inverse"):
        same = bool(torch.equal(getattr(plan_t, field), getattr(plan_r, field)))
        _record(case=name, dtype=str(dtype)[6:], tensor=f"plan.{field}", mismatch=0.0 if same else 1.0, ok=same)
        assert same, f"make_routing_plan: {field} differs from the reference"
    rows_t = functional.dispatch(x, plan_r, backend="triton")
    rows_r = functional.dispatch(x, plan_r, backend="reference")
    assert torch.equal(rows_t, rows_r), "dispatch: rows differ (it is a copy: must be exact)"
    combined_t = functional.combine(rows_r, w_r, plan_r, backend="triton")
    combined_r = functional.combine(rows_r.double(), w_r.double(), plan_r, backend="reference")
    _compare(name, dtype, ["topk weights", "combine"], [w_t, combined_t], [w_r, combined_r])
