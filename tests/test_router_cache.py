"""The eval cache of the graph router's token-independent terms (gmoe.router_cache).

Cached and uncached routing run the same code on one machine, so they are compared bitwise;
every change to what the terms depend on must be seen by the very next forward.
"""
import copy

import pytest
import torch

from gmoe import GMoEConfig, GMoEModel, get_gmoe_model
from gmoe.router import GraphRouter
from tests.models import tiny_model

SMALL = dict(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_dim=16, edge_density=0.5)


def _router(**kwargs):
    torch.manual_seed(0)
    return GraphRouter(32, 4, 2, 16, 2, 0.5, "silu", token_init_gain=1.0, **kwargs).eval()


def _route(router, x, backend="reference", cache=True):
    router.cache_terms = cache
    try:
        with torch.no_grad():
            return router(x, backend=backend)
    finally:
        router.cache_terms = True


def _assert_same(got, want):
    for name, a, b in zip(("logits", "probs", "indices", "weights"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cached_routing_is_bitwise_the_uncached(backend):
    router = _router()
    x = torch.randn(5, 32)
    uncached = _route(router, x, backend, cache=False)
    first, second = _route(router, x, backend), _route(router, x, backend)
    _assert_same(first, uncached)
    _assert_same(second, uncached)
    assert router.term_cache.builds == 1
    # and the eval path gives what the training path (C1 inside the op) gives
    train_path = router.train()(x, backend=backend)
    for a, b in zip(uncached, train_path):
        torch.testing.assert_close(a, b.detach(), atol=0, rtol=1e-6)


@pytest.mark.parametrize("change", ["expert_weight", "gcn_weight", "expert_features", "expert_adjacency"])
def test_an_in_place_change_is_seen_at_the_next_forward(change):
    router = _router()
    x = torch.randn(4, 32)
    before = _route(router, x)
    with torch.no_grad():
        tensor = getattr(router, change)
        if change == "expert_adjacency":
            tensor.copy_(~tensor & ~torch.eye(4, dtype=torch.bool))   # the complement graph
        else:
            tensor.mul_(-2.0)
    after = _route(router, x)
    _assert_same(after, _route(router, x, cache=False))
    assert not torch.equal(after[0], before[0])
    assert router.term_cache.builds == 2


# fused: writes the parameters without bumping their version counters (Trainer's default optimizer)
@pytest.mark.parametrize("optimizer_kind", ["for-loop", "foreach", "fused"])
def test_an_optimizer_step_and_a_state_dict_load_are_seen(optimizer_kind):
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    ids = torch.randint(0, 64, (2, 6))
    initial = copy.deepcopy(model.adapter_state_dict())
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.train()
    kind = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05,
                                  **kind[optimizer_kind])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()

    def both():
        with torch.no_grad():
            cached = model(input_ids=ids).logits
            model.router_cache = False
            uncached = model(input_ids=ids).logits
            model.router_cache = True
        return cached, uncached

    cached, uncached = both()
    assert torch.equal(cached, uncached) and not torch.equal(cached, before)
    model.load_adapter_state_dict(initial)
    cached, uncached = both()
    assert torch.equal(cached, uncached) and torch.equal(cached, before)


@pytest.mark.parametrize("where", ["eval mode", "training mode"])
def test_a_fused_step_after_a_gradient_forward_is_seen_without_a_mode_switch(where):
    # a fused step leaves the version counters as they were: the forward that recorded the
    # gradient must have dropped the cache, whether the loop trains in eval or training mode
    router = _router()   # in eval mode
    x = torch.randn(4, 32)
    before = _route(router, x)
    if where == "training mode":
        router.train()
    optimizer = torch.optim.AdamW(router.parameters(), lr=0.5, fused=True)
    versions = [p._version for p in router.parameters()]
    router(x, backend="reference")[0].square().sum().backward()
    optimizer.step()
    assert [p._version for p in router.parameters()] == versions  # what the cache's key cannot see
    if where == "training mode":
        router.eval()
    after = _route(router, x)
    _assert_same(after, _route(router, x, cache=False))
    assert not torch.equal(after[0], before[0])


@pytest.mark.parametrize("where", ["eval mode", "training mode"])
def test_router_loss_targets_follow_a_fused_step(where):
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    ids = torch.randint(0, 64, (2, 6))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)   # the targets of the initial λ, σ are cached
    if where == "training mode":
        model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5, fused=True)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        served = model(input_ids=ids, labels=ids).router_loss
        for layer in model.gmoe_layers():
            layer.target_cache.clear()
        fresh = model(input_ids=ids, labels=ids).router_loss   # (eval: the load does not advance)
    assert torch.equal(served, fresh)


def test_dtype_device_and_backend_changes_rebuild():
    router = _router()
    x = torch.randn(3, 32)
    _route(router, x)
    router.double()
    got = _route(router, x.double())
    assert got[0].dtype == torch.float64 and router.term_cache.builds == 2
    _assert_same(got, _route(router, x.double(), cache=False))
    _route(router, x.double(), backend="triton")
    assert router.term_cache.builds == 3


def test_no_cache_while_autograd_needs_the_terms():
    router = _router()
    x = torch.randn(3, 32)
    logits = router(x, backend="reference")[0]   # eval mode, grad mode on, trainable router
    logits.square().sum().backward()
    assert router.expert_weight.grad is not None and router.expert_weight.grad.abs().sum() > 0
    assert router.term_cache.builds == 0
    router.requires_grad_(False)                # frozen (an adapter loaded for inference): cached
    router(x, backend="reference")
    assert router.term_cache.builds == 1


def test_inference_mode_values_stay_in_inference_mode():
    router = _router()
    x = torch.randn(3, 32, requires_grad=True)
    router.requires_grad_(False)
    with torch.inference_mode():
        router(x.detach(), backend="reference")
    # an inference tensor cannot be saved for backward: outside, the cache builds anew
    router(x, backend="reference")[1].sum().backward()
    assert router.term_cache.builds == 2 and x.grad is not None


def test_writes_through_data_need_clear_router_cache(tmp_path):
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL)).eval()
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        model(input_ids=ids)
        for layer in model.gmoe_layers():
            layer.router.expert_weight.data.mul_(-3.0)   # invisible to the version counter
        model.clear_router_cache()
        cached = model(input_ids=ids).logits
        model.router_cache = False
        assert torch.equal(cached, model(input_ids=ids).logits)
    assert model.router_cache is False
    model.save_pretrained(tmp_path / "a")
    loaded = GMoEModel.from_pretrained(model.unload(), tmp_path / "a")
    assert loaded.router_cache is True   # a runtime setting: never saved with the adapter
