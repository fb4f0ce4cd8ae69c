"""Reference twin of the graph router (DESIGN.md, "Graph router").

Node order: the E expert nodes first, the token node last (index E). Every token's graph
has the same normalised adjacency Â and the same expert rows in the first layer's input,
so layer 1 is a token-independent constant plus a rank-1 term in the token node:

  Â N^0 W_1^T = (Â[:, :E] P) W_1^T  +  Â[:, E] ⊗ (t W_1^T),   P = act(X W_exp^T)

No per-token graph or sparse matrix is built. Later layers are a dense (E+1)x(E+1) mix per
token (tiny: E ≤ 64). Everything runs in fp32 (fp64 for fp64 inputs); probabilities are a softmax in fp32.
"""
from __future__ import annotations

import torch

from ..activations import act, compute_dtype
from .routing import topk_route


def normalized_adjacency(expert_adjacency: torch.Tensor) -> torch.Tensor:
    """Â = D^-1/2 (A + I) D^-1/2 over E experts plus the token node, in fp32.

    expert_adjacency: (E, E) bool/0-1, symmetric, zero diagonal: the expert–expert edges.
    The token node (index E) is joined to every expert; every node has a self-loop.
    """
    num_experts = expert_adjacency.shape[0]
    a = torch.zeros(num_experts + 1, num_experts + 1, dtype=torch.float32,
                    device=expert_adjacency.device)
    a[:num_experts, :num_experts] = (expert_adjacency != 0).float()
    a[:num_experts, num_experts] = 1.0
    a[num_experts, :num_experts] = 1.0
    a.fill_diagonal_(1.0)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


def router_logits(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                  score_weight, activation: str) -> torch.Tensor:
    """Expert logits (T, E) fp32 of the graph router; see `graph_router` for shapes."""
    f32 = compute_dtype(x)
    num_experts = expert_features.shape[0]
    adj = adjacency.to(f32)
    token_node = act(activation, x.to(f32) @ token_weight.to(f32).t())          # (T, G)
    expert_nodes = act(activation, expert_features.to(f32) @ expert_weight.to(f32).t())  # (E, G)
    nodes = None
    for layer in range(gcn_weight.shape[0]):
        w = gcn_weight[layer].to(f32)
        if layer == 0:
            constant = (adj[:, :num_experts] @ expert_nodes) @ w.t()            # (E+1, G)
            nodes = constant + adj[:, num_experts, None] * (token_node @ w.t())[:, None, :]
        else:
            # 2-D GEMMs only: einsum/matmul on 3-D operands pick kernels by requires_grad,
            # which would make frozen and trainable copies of a router differ in the last bit.
            num_tokens, num_nodes, width = nodes.shape
            mixed = adj @ nodes.transpose(0, 1).reshape(num_nodes, num_tokens * width)
            mixed = mixed.view(num_nodes, num_tokens, width).transpose(0, 1).reshape(-1, width)
            nodes = (mixed @ w.t()).view(num_tokens, num_nodes, width)
        nodes = act(activation, nodes)                                          # (T, E+1, G)
    expert_rows = nodes[:, :num_experts].reshape(-1, nodes.shape[-1])
    return (expert_rows @ score_weight.to(f32)).view(-1, num_experts)


def graph_router(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                 score_weight, top_k: int, activation: str):
    """Reference backend of `gmoe_kernels.functional.graph_router` (see there for shapes)."""
    logits = router_logits(x, token_weight, expert_weight, expert_features, adjacency,
                           gcn_weight, score_weight, activation)
    probs = torch.softmax(logits, dim=-1)
    indices, weights = topk_route(probs, top_k)
    return logits, probs, indices, weights
