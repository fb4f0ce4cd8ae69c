"""Every builder of random test problems, shared by the op tests (tiny shapes: interpreter-
friendly), and the GPU checks' problem at real shapes with its runners (tests/gpu/test_kernels.py,
tests/test_tolerances.py). Each builder draws from its own seeded generator, or from torch's
global one (seeded per test by tests/conftest.py) where it says so.
"""
from __future__ import annotations

import torch

from gmoe_kernels.reference import normalized_adjacency, topk_route


def expert_problem(T=13, H=10, F=14, E=4, K=2, R=3, dtype=torch.float64, routing="random",
                   requires_grad=True, seed=0):
    """Frozen FFN weights, non-zero LoRA experts, and a routing (indices, weights) of a given kind.

    routing: "random" | "one_expert" (every token to expert 0, needs K=1 or uses 0..K-1)
             | "empty_expert" (expert E-1 never chosen).
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, grad=False):
        t = (torch.randn(*shape, generator=g) * scale).to(dtype)
        return t.requires_grad_(grad and requires_grad)

    x = rand(T, H, grad=True)
    frozen = dict(gate_weight=rand(F, H, scale=H ** -0.5), up_weight=rand(F, H, scale=H ** -0.5),
                  down_weight=rand(H, F, scale=F ** -0.5))
    lora = dict(lora_a_gate=rand(E, R, H, scale=0.5, grad=True), lora_b_gate=rand(E, F, R, scale=0.5, grad=True),
                lora_a_up=rand(E, R, H, scale=0.5, grad=True), lora_b_up=rand(E, F, R, scale=0.5, grad=True),
                lora_a_down=rand(E, R, F, scale=0.5, grad=True), lora_b_down=rand(E, H, R, scale=0.5, grad=True))
    scores = torch.randn(T, E, generator=g)
    if routing == "one_expert":
        scores[:, 0] += 100.0
        for k in range(1, K):
            scores[:, k] += 50.0
    elif routing == "empty_expert":
        scores[:, E - 1] = -100.0
    probs = torch.softmax(scores, -1).to(dtype)
    p_k, indices = torch.topk(probs, K, dim=-1)
    weights = (p_k / p_k.sum(-1, keepdim=True)).requires_grad_(requires_grad)
    return x, frozen, lora, indices, weights


def router_problem(T=9, H=12, G=8, E=4, L=2, K=2, dtype=torch.float64, edges=((0, 1), (1, 2)), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(grad)

    adjacency = torch.zeros(E, E, dtype=torch.bool)
    for i, j in edges:
        adjacency[i, j] = adjacency[j, i] = True
    return dict(x=rand(T, H), token_weight=rand(G, H, scale=H ** -0.5), expert_weight=rand(G, H, scale=H ** -0.5),
                expert_features=rand(E, H, grad=False), adjacency=normalized_adjacency(adjacency).to(dtype),
                gcn_weight=rand(L, G, G, scale=G ** -0.5), score_weight=rand(G))


def expert_graph(E, kind, g):
    """(E, E) bool expert-expert edges of a named kind: complete | twins | isolated | random."""
    if kind == "complete":
        a = torch.ones(E, E, dtype=torch.bool)
    elif kind == "twins":  # experts 0 and 1: joined, same neighbours -> identical logits
        a = torch.zeros(E, E, dtype=torch.bool)
        a[0, 1] = True
        for j in range(2, E, 2):
            a[0, j] = a[1, j] = True
    else:
        a = torch.rand(E, E, generator=g) < 0.4
        if kind == "isolated":  # the last expert has no expert neighbour
            a[E - 1, :] = False
            a[:, E - 1] = False
    a = a | a.t()
    a.fill_diagonal_(False)
    return a


def gcn_op_inputs(T=5, G=16, E=3, L=2, seed=0):
    """(generator, c1, token_proj, Â, gcn_weight) of the Triton router's GCN ops at opcheck size,
    the trainable ones requiring grad; the generator goes on to draw the readout input."""
    g = torch.Generator().manual_seed(seed)
    c1 = torch.randn(E + 1, G, generator=g).requires_grad_(True)
    token_proj = torch.randn(T, G, generator=g).requires_grad_(True)
    adjacency = normalized_adjacency(expert_graph(E, "complete", g))
    gcn_weight = (torch.randn(L, G, G, generator=g) / 4).requires_grad_(True)
    return g, c1, token_proj, adjacency, gcn_weight


def graph_router_problem(T=20, H=32, G=24, E=8, L=2, graph="random", dtype=torch.float32, seed=0,
                         zero_score=False, twin_features=False, noncontiguous=False,
                         asymmetric=False):
    """(trainable, frozen, edges) of a graph-router problem: trainable x and router weights,
    frozen expert features and Â (fp32 unless fp64), the (E, E) expert edges."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    edges = expert_graph(E, graph, g)
    features = rand(E, H)
    if twin_features:
        features[1] = features[0]
    gcn = rand(L, G, G, scale=G ** -0.5)
    if noncontiguous:  # a transposed view: the kernels take any strides
        gcn = gcn.transpose(1, 2).contiguous().transpose(1, 2)
    score = torch.zeros(G) if zero_score else rand(G, scale=G ** -0.5)
    trainable = dict(x=rand(T, H), token_weight=rand(G, H, scale=H ** -0.5),
                     expert_weight=rand(G, H, scale=H ** -0.5), gcn_weight=gcn,
                     score_weight=score)
    trainable = {k: v.to(dtype).requires_grad_(True) for k, v in trainable.items()}
    adjacency = normalized_adjacency(edges)
    if asymmetric:  # not a GCN Â, but it tells Â from Âᵀ in the backward
        adjacency = adjacency * (0.5 + torch.rand(E + 1, E + 1, generator=g))
    frozen = dict(expert_features=features.to(dtype),
                  adjacency=adjacency.to(dtype if dtype == torch.float64 else torch.float32))
    return trainable, frozen, edges


# ---- expert-mix cases (tests/test_triton_expert_mix.py): `case` has T, H, F, E, K, R, routing;
# these draw from torch's global generator.

def case_routing(case, generator=None):
    """indices (T, K) int64 and fp32 weights (T, K) from top-K over random probabilities;
    case.routing: random | empty_expert (expert E-2 never chosen) | one_expert (expert 2 in
    every token's top 1)."""
    logits = torch.randn(case.T, case.E, generator=generator)
    if case.routing == "empty_expert":
        logits[:, case.E - 2] = -torch.inf           # expert E-2 never chosen
    elif case.routing == "one_expert":
        logits[:, 2] = 1e4                           # every token's top-1 is expert 2
    probs = torch.softmax(logits, dim=-1)
    indices, weights = topk_route(probs, case.K)
    counts = torch.bincount(indices.reshape(-1), minlength=case.E)
    if case.routing == "empty_expert":
        assert counts[case.E - 2] == 0
    if case.routing == "one_expert":
        assert counts[2] == case.T * case.K
    return indices, weights


def case_ffn(case, dtype):
    """Frozen weights, LoRA weights (B nonzero), x: a full GMoE FFN in `dtype`."""
    T, H, F, E, R = case.T, case.H, case.F, case.E, case.R
    p = dict(
        x=torch.randn(T, H),
        gate_weight=torch.randn(F, H) / H**0.5,
        up_weight=torch.randn(F, H) / H**0.5,
        down_weight=torch.randn(H, F) / F**0.5,
        lora_a_gate=torch.randn(E, R, H) / H**0.5,
        lora_b_gate=torch.randn(E, F, R) / R**0.5 * 0.5,
        lora_a_up=torch.randn(E, R, H) / H**0.5,
        lora_b_up=torch.randn(E, F, R) / R**0.5 * 0.5,
        lora_a_down=torch.randn(E, R, F) / F**0.5,
        lora_b_down=torch.randn(E, H, R) / R**0.5 * 0.5,
    )
    return {k: v.to(dtype) for k, v in p.items()}


def case_mix_inputs(case, dtype):
    """The expert-mix inputs (x, G, U, LoRA weights) in `dtype`."""
    p = case_ffn(case, dtype)
    gate_base = (p["x"].float() @ p["gate_weight"].float().t()).to(dtype)
    up_base = (p["x"].float() @ p["up_weight"].float().t()).to(dtype)
    return [p["x"], gate_base, up_base, p["lora_a_gate"], p["lora_b_gate"], p["lora_a_up"],
            p["lora_b_up"], p["lora_a_down"]]


def case_routing_indices(case):
    """Routing-op cases (tests/test_triton_routing.py: T, K, E, num_experts, routing): indices
    and weights of a top-K over E experts, with at least one of num_experts left empty."""
    logits = torch.randn(case.T, case.E)
    if case.routing == "empty_expert":
        logits[:, 1] = -torch.inf
    elif case.routing == "one_expert":
        logits[:, 3] = 1e4
    probs = torch.softmax(logits, dim=-1)
    indices, weights = topk_route(probs, case.K)
    counts = torch.bincount(indices.reshape(-1), minlength=case.num_experts)
    assert (counts == 0).any(), "every routing test includes an empty expert"
    return indices, weights


def skewed_ffn_problem(kind, dtype, T, H, F, E, K, R):
    """A GMoE FFN (named weights) on a skewed routing of benchmarks.shapes.make_routing
    (`kind`, one empty expert): (params, indices, weights)."""
    from benchmarks.shapes import make_routing

    g = torch.Generator().manual_seed(3)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    params = dict(x=rand(T, H, scale=1.0), gate_weight=rand(F, H, scale=H ** -0.5),
                  up_weight=rand(F, H, scale=H ** -0.5), down_weight=rand(H, F, scale=F ** -0.5),
                  lora_a_gate=rand(E, R, H, scale=H ** -0.5), lora_b_gate=rand(E, F, R, scale=0.3),
                  lora_a_up=rand(E, R, H, scale=H ** -0.5), lora_b_up=rand(E, F, R, scale=0.3),
                  lora_a_down=rand(E, R, F, scale=F ** -0.5), lora_b_down=rand(E, H, R, scale=0.3))
    indices, weights = make_routing(T, E, K, kind, empty=1, seed=3)
    return params, indices, weights


def property_expert_inputs(sizes, g, dtype):
    """x, frozen [W_g, W_u, W_d] and the six LoRA tensors of a hypothesis-drawn problem
    (tests/test_properties.py: sizes T, E, R, H, F; generator g)."""
    T, E, R, H, F = (sizes[k] for k in "TERHF")

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    frozen = [rand(F, H, scale=H ** -0.5).detach(), rand(F, H, scale=H ** -0.5).detach(),
              rand(H, F, scale=F ** -0.5).detach()]
    lora = [rand(E, R, H, scale=0.5), rand(E, F, R, scale=0.5), rand(E, R, H, scale=0.5),
            rand(E, F, R, scale=0.5), rand(E, R, F, scale=0.5), rand(E, H, R, scale=0.5)]
    return rand(T, H), frozen, lora


# ---- the GPU checks' problem at real shapes, and its runners (benchmarks' problem registry)

def gpu_problem(H, F, T, E, K, R, dtype, routing="balanced", empty=0, device="cuda"):
    """benchmarks.contenders' FFN and router problem of one shape, with a routing of
    benchmarks.shapes.make_routing (`routing`, `empty` unused experts)."""
    from benchmarks import contenders
    from benchmarks.shapes import Case, Shape, Variant, make_routing

    shape = Shape("gpu-check", H, F, T, (Variant(E, K, R),))
    p = contenders.make_problem(Case(shape, shape.variants[0]), torch.device(device), dtype)
    indices, weights = make_routing(T, E, K, routing, empty=empty, device=device)
    p.indices, p.weights = indices, weights.requires_grad_(True)
    return p


def router_gpu_problem(H, T, E, K, G, L, dtype, device="cuda", name="gpu-check"):
    """benchmarks.contenders' router problem of one shape."""
    from benchmarks import contenders
    from benchmarks.shapes import Case, Shape, Variant

    shape = Shape(name, H, 64, T, (Variant(E, K, 2),), gcn_dim=G, gcn_layers=L)
    return contenders.make_problem(Case(shape, shape.variants[0]), torch.device(device), dtype)


def caster(dtype):
    """cast(t, grad=True, keep=None): a leaf copy of t in `dtype` (in `keep` instead, unless
    dtype is fp64), requiring grad where t did and `grad` allows."""
    def cast(t, grad=True, keep=None):
        target = keep if (keep is not None and dtype != torch.float64) else dtype
        return t.detach().to(target).requires_grad_(grad and t.requires_grad)
    return cast


def ffn_outputs(p, backend, cast):
    """functional.expert_ffn on a gpu_problem: (names, [y, gradient of every leaf])."""
    from gmoe_kernels import functional

    leaves = {"x": cast(p.x), "weights": cast(p.weights, keep=torch.float32),
              **{k: cast(v) for k, v in p.lora.items()}}
    frozen = {k: cast(v, grad=False) for k, v in p.frozen.items()}
    rest = {k: v for k, v in leaves.items() if k not in ("x", "weights")}
    y = functional.expert_ffn(leaves["x"], **frozen, **rest, indices=p.indices, weights=leaves["weights"],
                              scaling=p.scaling, activation=p.activation, backend=backend)
    grads = torch.autograd.grad(y, list(leaves.values()), p.dy.to(y.dtype))
    return ["y", *[f"d_{k}" for k in leaves]], [y, *grads]


def router_outputs(p, backend, cast):
    """functional.graph_router on a router problem: (names, [logits, probs, gradients],
    indices, weights)."""
    from gmoe_kernels import functional

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
