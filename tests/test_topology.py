"""The expert graph: density, symmetry, no twins; twins detected and warned about."""
import warnings

import pytest
import torch

from gmoe.topology import build_expert_graph, find_twins, warn_if_twins


@pytest.mark.parametrize("E,density", [(8, 0.1), (8, 0.5), (16, 0.1), (32, 0.3), (64, 0.1)])
def test_graph_is_symmetric_twin_free_and_near_density(E, density):
    adjacency = build_expert_graph(torch.randn(E, 16), density)
    assert torch.equal(adjacency, adjacency.t())
    assert not adjacency.diagonal().any()
    assert find_twins(adjacency) == []
    target = round(density * E * (E - 1) / 2)
    assert abs(int(adjacency.sum()) // 2 - target) <= 1


def test_most_similar_pairs_are_preferred():
    nodes = torch.randn(8, 16)
    nodes[3] = nodes[5] * 2 + 1e-3 * torch.randn(16)  # 3 and 5 nearly parallel
    adjacency = build_expert_graph(nodes, 0.2)
    assert adjacency[3, 5]


def test_a_default_injection_does_not_warn_and_logs_the_edge_count(caplog):
    from gmoe import GMoEConfig, get_gmoe_model
    from tests.models import tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level("DEBUG", logger="gmoe.topology"):
            get_gmoe_model(tiny_model("llama"), GMoEConfig(num_experts=8, top_k=2, r=2))
    assert any("edges placed for the 3 that edge_density asks" in r.getMessage() for r in caplog.records)


def test_zero_density_gives_no_edges():
    assert not build_expert_graph(torch.randn(8, 4), 0.0).any()


def test_twins_found_and_warned():
    adjacency = torch.zeros(4, 4, dtype=torch.bool)
    adjacency[0, 1] = adjacency[1, 0] = True  # a lone edge: 0 and 1 are twins
    assert find_twins(adjacency) == [(0, 1)]
    with pytest.warns(UserWarning, match=r"\(0, 1\)"):
        warn_if_twins(adjacency, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_twins(torch.zeros(4, 4, dtype=torch.bool), "test")
