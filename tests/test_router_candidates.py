"""The router prototypes of `benchmarks/router_candidates.py` (docs/routing.md): their dense per-token
maths is the published graph router's wherever the candidate's interaction is neutral, so what they
measure differs from the published router by the interaction alone."""
import copy

import pytest
import torch

from benchmarks.router_candidates import make_prototype
from gmoe.router import GraphRouter


def _router(seed=0):
    torch.manual_seed(seed)
    return GraphRouter(hidden_size=16, num_experts=6, top_k=2, gcn_dim=8, gcn_layers=2, edge_density=0.5,
                       activation="silu", token_init_gain=3.0).double()


def test_gatv2_with_uniform_attention_is_the_published_router():
    published = _router()
    gatv2 = make_prototype(copy.deepcopy(published), "gatv2").double()
    with torch.no_grad():
        gatv2.attention_weight.zero_()   # every α_i = 1/E: Â[i, t] = E·(1/E)·Â[i, t]
    x = torch.randn(11, 16, dtype=torch.float64)
    want, got = published(x, backend="reference"), gatv2(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)   # logits
    assert torch.equal(got[2], want[2])                                  # top-k experts


def test_film_with_zero_modulation_is_the_published_router_without_expert_features():
    published = _router()
    film = make_prototype(copy.deepcopy(published), "film").double()
    no_experts = copy.deepcopy(published)
    with torch.no_grad():
        film.film_weight.zero_()           # P_i ⊙ (W_f x) = 0: only the token node feeds the graph
        no_experts.expert_weight.zero_()   # P = SiLU(0) = 0 in the published router
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(film(x)[0], no_experts(x, backend="reference")[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["film", "gatv2"])
def test_prototypes_are_differentiable_in_their_own_parameters(kind):
    router = make_prototype(_router(), kind).double()
    x = torch.randn(7, 16, dtype=torch.float64)
    logits = router(x)[0]
    own = [router.film_weight] if kind == "film" else [router.source_weight, router.target_weight, router.attention_weight]
    grads = torch.autograd.grad(logits.square().sum(), own)
    assert all(g.abs().sum() > 0 for g in grads)
