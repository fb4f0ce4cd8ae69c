"""The router contenders of one `Problem` (`router_contenders`): the graph router on each backend,
its per-token loop oracle, the published approach (PyG GCNConv over a block-diagonal graph) and
the linear router.
"""
from __future__ import annotations

import torch

from gmoe_kernels import functional
from gmoe_kernels.activations import act
from gmoe_kernels.reference import topk_route

from .common import ROUTER_IMPLS, Contender, Problem, collect, package_missing, triton_missing, unavailable


def block_diagonal_edges(expert_adjacency: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """edge_index (2, T·n_edges) of T copies of the (E+1)-node token graph (token node last).

    Expert–expert edges from `expert_adjacency`, token <-> every expert both ways; GCNConv adds
    the self-loops and the symmetric normalisation itself.
    """
    E = expert_adjacency.shape[0]
    device = expert_adjacency.device
    ee = expert_adjacency.nonzero().t()
    experts = torch.arange(E, device=device)
    token = torch.full((E,), E, device=device)
    one = torch.cat([ee, torch.stack([token, experts]), torch.stack([experts, token])], dim=1)
    offsets = (torch.arange(num_tokens, device=device) * (E + 1)).repeat_interleave(one.shape[1])
    return one.repeat(1, num_tokens) + offsets


def _router_grads(p: Problem):
    gen = torch.Generator().manual_seed(1)
    T, E, K = p.x.shape[0], p.case.variant.experts, p.case.variant.top_k
    gp = torch.randn(T, E, generator=gen).to(p.x.device)
    gw = torch.randn(T, K, generator=gen).to(p.x.device)
    return lambda outs: (gp.to(outs[0].dtype), gw.to(outs[1].dtype))


def _graph_leaves(p: Problem) -> list:
    """The trainable inputs of the graph router: x and its weights (expert features are fixed)."""
    r = p.router
    return [p.x, r["token_weight"], r["expert_weight"], r["gcn_weight"], r["score_weight"]]


def _route(logits: torch.Tensor, top_k: int):
    """(probs, weights) of fp32 logits: softmax, then the reference top-k."""
    probs = torch.softmax(logits, -1)
    indices, weights = topk_route(probs, top_k)
    return probs, weights


def _pyg_router(p: Problem) -> Contender:
    from torch_geometric.nn import GCNConv

    E, K = p.case.variant.experts, p.case.variant.top_k
    T, G = p.x.shape[0], p.case.shape.gcn_dim
    r = p.router
    convs = []
    for layer in range(p.case.shape.gcn_layers):
        conv = GCNConv(G, G, bias=False).to(device=p.x.device, dtype=p.x.dtype)
        with torch.no_grad():
            conv.lin.weight.copy_(r["gcn_weight"][layer])
        convs.append(conv)
    edge_index = block_diagonal_edges(p.expert_adjacency, T)  # built once, outside the timing
    name = p.activation

    def forward():
        token_nodes = act(name, p.x @ r["token_weight"].t())                        # (T, G)
        expert_nodes = act(name, r["expert_features"] @ r["expert_weight"].t())     # (E, G)
        nodes = torch.cat([expert_nodes.expand(T, E, G), token_nodes[:, None]], 1).reshape(-1, G)
        for conv in convs:
            nodes = act(name, conv(nodes, edge_index))
        return _route((nodes.view(T, E + 1, G)[:, :E] @ r["score_weight"]).float(), K)

    leaves = [p.x, r["token_weight"], r["expert_weight"], r["score_weight"], *[c.lin.weight for c in convs]]
    return Contender("graph-pyg", "router", forward=forward, leaves=leaves, grads=_router_grads(p),
                     persistent=[p.x, *r.values(), *leaves], note="GCNConv, block-diagonal T·(E+1) graph")


def _graph_router(p: Problem, backend: str) -> Contender:
    r = p.router
    K = p.case.variant.top_k

    def forward():
        logits, probs, indices, weights = functional.graph_router(
            p.x, r["token_weight"], r["expert_weight"], r["expert_features"], r["adjacency"],
            r["gcn_weight"], r["score_weight"], K, p.activation, backend=backend)
        return probs, weights

    return Contender(f"graph-{backend}", "router", forward=forward, leaves=_graph_leaves(p),
                     grads=_router_grads(p), persistent=[p.x, *r.values()])


def _loop_router(p: Problem) -> Contender:
    from gmoe_kernels.naive import graph_router_loop

    r = p.router
    K = p.case.variant.top_k

    def forward():
        logits = graph_router_loop(p.x, r["token_weight"], r["expert_weight"], r["expert_features"],
                                   r["adjacency"].to(p.x.dtype), r["gcn_weight"], r["score_weight"],
                                   p.activation).float()
        return _route(logits, K)

    return Contender("graph-loop", "router", forward=forward, leaves=_graph_leaves(p), grads=_router_grads(p),
                     persistent=[p.x, *r.values()], note="one dense (E+1)-node GCN per token, in Python")


def _linear_router(p: Problem) -> Contender:
    K = p.case.variant.top_k

    def forward():
        probs = torch.softmax((p.x @ p.linear_weight.t()).float(), dim=-1)
        indices, weights = functional.topk_route(probs, K, backend="reference")
        return probs, weights

    return Contender("linear", "router", forward=forward, leaves=[p.x, p.linear_weight],
                     grads=_router_grads(p), persistent=[p.x, p.linear_weight])


def router_contenders(p: Problem, impls=ROUTER_IMPLS) -> list[Contender]:
    def build(impl: str, rows: list) -> Contender:
        if impl == "graph-triton":
            why = triton_missing("graph_router", p.x.device)
            return unavailable(impl, "router", why) if why else _graph_router(p, "triton")
        if impl == "graph-reference":
            return _graph_router(p, "reference")
        if impl == "graph-pyg":
            why = package_missing("torch_geometric")
            return unavailable(impl, "router", why) if why else _pyg_router(p)
        if impl == "linear":
            return _linear_router(p)
        if impl == "graph-loop":
            return _loop_router(p)
        raise ValueError(f"unknown router contender {impl!r}; known: {ROUTER_IMPLS}")

    return collect("router", impls, build)
