"""Batched generation with left padding gives each prompt's own greedy tokens, and padding never
routes, counts or reaches the experts (gmoe.padding).

fp64 models: a batch and a single prompt compute the same logits up to rounding in a different
order (padded attention, other GEMM shapes); in fp64 no greedy choice is that close.
"""
import pytest
import torch

from gmoe import GMoEConfig, get_gmoe_model
from gmoe_kernels import functional
from tests.models import tiny_model

SMALL = dict(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_dim=16, edge_density=0.5)
LENGTHS = (5, 2, 7)
PAD = 0


def _model(backend="reference", router="graph"):
    torch.manual_seed(0)
    base = tiny_model("llama").double()
    model = get_gmoe_model(base, GMoEConfig(**SMALL, router=router, backend=backend))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.generation_config.pad_token_id = PAD
    return model.eval()


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 64, (n,), generator=g) for n in LENGTHS]


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def _generate(model, ids, mask, use_cache, new=5):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, use_cache=use_cache)
    return out[:, ids.shape[1]:]


def _check_batch_equals_singles(model, use_cache):
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    batch = _generate(model, ids, mask, use_cache)
    for i, p in enumerate(prompts):
        alone = _generate(model, p[None], torch.ones(1, len(p), dtype=torch.long), use_cache)
        assert torch.equal(batch[i], alone[0]), f"prompt {i}: {batch[i].tolist()} batched, {alone[0].tolist()} alone"


@pytest.mark.parametrize("router_cache", [True, False], ids=["router-cache", "no-router-cache"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-kv-cache"])
def test_left_padded_batch_generates_each_prompts_tokens(use_cache, router_cache):
    model = _model()
    model.router_cache = router_cache
    _check_batch_equals_singles(model, use_cache)


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-kv-cache"])
def test_left_padded_batch_on_the_triton_interpreter(use_cache):
    _check_batch_equals_singles(_model("triton"), use_cache)


def test_linear_router_batch_generates_each_prompts_tokens():
    _check_batch_equals_singles(_model(router="linear"), use_cache=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_padding_never_routes_counts_or_reaches_the_experts(backend, monkeypatch):
    model = _model(backend)
    ids, mask = _left_padded(_prompts())
    real = int(mask.sum())
    routed, mixed = [], []
    router, mix = functional.graph_router, functional.expert_mix
    monkeypatch.setattr(functional, "graph_router", lambda x, *a, **k: routed.append(x.shape[0]) or router(x, *a, **k))
    monkeypatch.setattr(functional, "expert_mix", lambda x, *a, **k: mixed.append(x.shape[0]) or mix(x, *a, **k))
    with torch.no_grad(), model.measuring_routing():
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        stats = model.routing_stats()
    assert routed == mixed == [real] * 2           # two layers, real tokens only
    assert stats.tokens == real                    # counted once per real token
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.router_loss)
    routed.clear()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert routed[:2] == [real] * 2 and routed[2:] == [len(LENGTHS)] * 2   # prefill, then one token per row
    assert torch.equal(model.expert_load(), torch.zeros(2, 4))             # eval counts no load


def test_training_forward_keeps_every_row():
    """The training step is unchanged: every row is routed, the mask only weights the losses."""
    model = _model().train()
    ids, mask = _left_padded(_prompts())
    seen = []
    router = functional.graph_router
    try:
        functional.graph_router = lambda x, *a, **k: seen.append(x.shape[0]) or router(x, *a, **k)
        model(input_ids=ids, attention_mask=mask, labels=ids)
    finally:
        functional.graph_router = router
    assert seen == [ids.numel()] * 2
