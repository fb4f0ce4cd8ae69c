"""Random problem builders shared by the op tests (tiny shapes: interpreter-friendly)."""
from __future__ import annotations

import torch

from gmoe_kernels.reference import normalized_adjacency


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
