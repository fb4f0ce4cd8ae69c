"""Micro-benchmarks of every op on small shapes, grouped by op (pytest-benchmark).

  pytest benchmarks --benchmark-only                       # all
  pytest benchmarks --benchmark-only -k expert_ffn         # one op
  pytest benchmarks --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,ops

Groups are "<op> <case> <mode>", so each table compares the reference twin with the
published loop (and Triton on a GPU) on identical inputs, built by benchmarks.contenders.
Cases: E8-K2-R8 and E32-K8-R8 with the linear router's (balanced) routing, and E8-K2-R8 with
skewed routings from `shapes.make_routing` (zipf; one hot expert with most tokens).
"""
import pytest
import torch

from benchmarks import contenders
from benchmarks.shapes import SHAPES, Case, make_routing
from gmoe_kernels import functional

TINY = SHAPES["tiny"]
CASES = [Case(TINY, TINY.variants[0]), Case(TINY, TINY.variants[1]),   # E8-K2-R8, E32-K8-R8
         Case(TINY, TINY.variants[0], "zipf"), Case(TINY, TINY.variants[0], "hot")]
MODES = ["fwd", "fwd_bwd"]
_problems = {}


def case_id(case):
    return case.label.split("/", 1)[1]   # "E8-K2-R8", "E8-K2-R8/zipf"


def problem(case, device):
    key = (case, device.type)
    if key not in _problems:
        p = contenders.make_problem(case, device, torch.float32 if device.type == "cpu" else torch.bfloat16)
        if case.routing != "balanced":   # make_problem routes by its linear router (balanced)
            v = case.variant
            p.indices, weights = make_routing(case.shape.tokens, v.experts, v.top_k, case.routing, device=device)
            p.weights = weights.requires_grad_(True)
        _problems[key] = p
    return _problems[key]


def _run(benchmark, contender, group, mode, device):
    if contender.error:
        pytest.skip(contender.error)
    if mode == "fwd_bwd" and contender.inference_only:
        pytest.skip("inference only")
    benchmark.group = group
    call = contender.fwd if mode == "fwd" else contender.fwd_bwd

    def fn():
        call()
        if device.type == "cuda":  # time the kernels, not only their launch
            torch.cuda.synchronize()
    benchmark(fn)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("impl", ["gmoe-reference", "loop", "gmoe-triton"])
def test_expert_ffn(benchmark, device, impl, case, mode):
    c = contenders.ffn_contenders(problem(case, device), [impl])[0]
    _run(benchmark, c, f"expert_ffn {case.label} {mode}", mode, device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_expert_mix(benchmark, device, backend, case, mode):
    """The fused op alone (frozen GEMMs outside): h_c and z from x, W_g x, W_u x."""
    p = problem(case, device)
    why = contenders.triton_missing("expert_mix", device) if backend == "triton" else None
    if why:
        pytest.skip(why)
    with torch.no_grad():
        gate_base = (p.x @ p.frozen["gate_weight"].t()).requires_grad_(True)
        up_base = (p.x @ p.frozen["up_weight"].t()).requires_grad_(True)
    lo = p.lora
    args = (lo["lora_a_gate"], lo["lora_b_gate"], lo["lora_a_up"], lo["lora_b_up"], lo["lora_a_down"])

    def forward():
        return functional.expert_mix(p.x, gate_base, up_base, *args, p.indices, p.weights, p.scaling,
                                     p.activation, backend=backend)

    E, _, R = lo["lora_b_down"].shape
    grads = (torch.randn_like(gate_base), torch.randn(p.x.shape[0], E * R, device=device, dtype=p.x.dtype))
    c = contenders.Contender(f"expert_mix-{backend}", "ffn", forward=forward,
                    leaves=[p.x, gate_base, up_base, *args, p.weights], grads=lambda outs: grads)
    _run(benchmark, c, f"expert_mix {case.label} {mode}", mode, device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES[:2], ids=case_id)   # routes itself
@pytest.mark.parametrize("impl", ["graph-reference", "graph-loop", "graph-triton", "graph-pyg"])
def test_graph_router(benchmark, device, impl, case, mode):
    c = contenders.router_contenders(problem(case, device), [impl])[0]
    _run(benchmark, c, f"graph_router {case.label} {mode}", mode, device)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", ["topk_route", "make_routing_plan", "dispatch", "combine"])
def test_routing(benchmark, device, op, backend, case):
    """The routing helpers: top-K, the plan (group by expert), gather and weighted combine."""
    if backend == "triton":
        why = contenders.triton_missing(op, device)
        if why:
            pytest.skip(why)
    p = problem(case, device)
    E, K = case.variant.experts, case.variant.top_k
    probs = torch.softmax((p.x.detach() @ p.linear_weight.detach().t()).float(), -1)
    plan = functional.make_routing_plan(p.indices, E, backend="reference")
    rows = functional.dispatch(p.x.detach(), plan, backend="reference")
    weights = p.weights.detach()
    call = {
        "topk_route": lambda: functional.topk_route(probs, K, backend=backend),
        "make_routing_plan": lambda: functional.make_routing_plan(p.indices, E, backend=backend),
        "dispatch": lambda: functional.dispatch(p.x.detach(), plan, backend=backend),
        "combine": lambda: functional.combine(rows, weights, plan, backend=backend),
    }[op]
    c = contenders.Contender(f"{op}-{backend}", "router", forward=lambda: (call(),), leaves=[p.x])
    _run(benchmark, c, f"routing {op} {case.label}", "fwd", device)
