"""The static expert–expert graph of the GMoE router: built once at injection, then stored.

Edges join the expert pairs whose initial expert node features are most alike
(largest |cos|), until `edge_density` of the E(E-1) ordered off-diagonal pairs is
connected. A candidate edge that would make two experts *twins* is skipped: under a
GCN two experts with identical closed neighbourhoods get identical logits for every
token (the token node is joined to all experts, so only expert–expert edges matter).

Repairing twins may leave the graph an edge or two off the asked count; that is logged at
debug level (logger `gmoe.topology`), not warned: it happens on default settings and the
graph actually built is the one stored with the adapter.
"""
from __future__ import annotations

import itertools
import logging
import warnings

import torch

_log = logging.getLogger(__name__)


def find_twins(adjacency: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of experts with identical closed neighbourhoods in (E, E) adjacency."""
    closed = (adjacency != 0) | torch.eye(adjacency.shape[0], dtype=torch.bool, device=adjacency.device)
    rows = [tuple(r) for r in closed.cpu().tolist()]
    return [(i, j) for i, j in itertools.combinations(range(len(rows)), 2) if rows[i] == rows[j]]


def build_expert_graph(expert_nodes: torch.Tensor, edge_density: float) -> torch.Tensor:
    """(E, E) bool symmetric adjacency with a zero diagonal, from initial node features (E, G).

    Twins are always adjacent experts with the same other neighbours (a lone edge i–j makes
    i and j twins), so a greedy pass cannot reject twin-making edges one at a time. Instead:
    take the `target` most similar pairs, then repair each remaining twin pair by adding the
    most similar edge that separates it (and dropping the least similar edge whose removal
    makes no twin, to keep the count), or, failing that, by dropping the twin edge itself.
    """
    num_experts = expert_nodes.shape[0]
    adjacency = torch.zeros(num_experts, num_experts, dtype=torch.bool)
    target = round(edge_density * num_experts * (num_experts - 1) / 2)
    if target == 0:
        return adjacency
    unit = torch.nn.functional.normalize(expert_nodes.detach().double().cpu(), dim=1)
    similarity = (unit @ unit.t()).abs()
    ranked = sorted(itertools.combinations(range(num_experts), 2),
                    key=lambda ij: (-similarity[ij].item(), ij))

    def set_edge(edge, value):
        adjacency[edge] = adjacency[edge[::-1]] = value

    for edge in ranked[:target]:
        set_edge(edge, True)
    for _ in range(4 * num_experts * num_experts):
        twins = find_twins(adjacency)
        if not twins:
            break
        i, j = twins[0]
        fixed = False
        for edge in ranked:  # most similar first
            if adjacency[edge] or not ({i, j} & set(edge)) or set(edge) == {i, j}:
                continue
            set_edge(edge, True)
            if len(find_twins(adjacency)) < len(twins):
                for old in reversed(ranked):  # least similar first
                    if adjacency[old] and old != edge:
                        set_edge(old, False)
                        if len(find_twins(adjacency)) < len(twins):
                            break
                        set_edge(old, True)
                fixed = True
                break
            set_edge(edge, False)
        if not fixed:
            set_edge((i, j), False)
    placed = int(adjacency.sum().item()) // 2
    if placed != target:
        # Expected, not a problem: for small graphs the twin repair often lands an edge off the
        # target (the default E 8, density 0.1 asks 3 of 28 pairs and gets 4), so a warning would
        # fire on every default injection. The graph actually built is stored in the adapter.
        _log.debug("expert graph: %d edges placed for the %d that edge_density asks; no twin-free graph "
                   "with exactly that many was found", placed, target)
    return adjacency


def warn_if_twins(adjacency: torch.Tensor, where: str) -> None:
    twins = find_twins(adjacency)
    if twins:
        warnings.warn(f"{where}: experts {twins} are twins (identical closed neighbourhoods in the "
                      "expert graph), so the graph router gives each pair identical logits for every "
                      "token and top-k breaks their ties by rounding noise", stacklevel=2)
