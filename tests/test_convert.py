"""gmoe.convert: adapters of the published GMoE code and of the mixlora package give their logits.

Adapters are written here in each format with random non-zero weights for tiny Llama, Qwen2
and Mistral models, loaded with gmoe.convert, and compared (fp32, eval mode) with:
- MixLoRA: the `mixlora` package itself, loading the same folder onto a copy of the base model;
- published GMoE: `PublishedGoEMoE` (tests/convert_formats.py), an independent transcription of the published forward
  (BAI-LAB/GMoE on mLoRA 0.3.2: GoEgate + GraphSparseMoe + LlamaMLP._mixlora_forward): the
  graph built from an edge list the way `GoEgate.get_edges` builds it, one (E+1)-node graph per
  token, GCN normalisation D^-1/2 (A with the diagonal set to 1) D^-1/2, run either densely or
  with PyTorch Geometric's `GCNConv` (when installed), then a per-expert loop.
"""
import copy
import json

import pytest
import torch
from transformers.activations import ACT2FN

from gmoe import GMoEModel
from gmoe.convert import from_published_gmoe, from_mixlora, published_expert_graph
from gmoe.layers import GMoEMLP, LoRALinear
from tests.convert_formats import (
    ATTENTION,
    FAMILIES,
    TOL,
    eval_logits,
    load_gmoe,
    mixlora_model,
    published_edge_list,
    published_model,
    save_adapter,
    token_ids,
    write_mixlora,
    write_published_gmoe,
)
from tests.models import tiny_model


# ----------------------------------------------------------------------------- published GMoE: logits

@pytest.mark.parametrize("gcn", ["dense", "pyg"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gmoe_reference_logits_match_published_forward(tmp_path, family, gcn):
    if gcn == "pyg":
        pytest.importorskip("torch_geometric")
    base = tiny_model(family)
    cfg, weights = write_published_gmoe(tmp_path / "adapter", base)
    ids, mask = token_ids()
    expected = eval_logits(published_model(base, cfg, weights, gcn), ids, mask)
    model = load_gmoe(copy.deepcopy(base), tmp_path / "adapter")
    got = eval_logits(model, ids, mask)
    assert (got - expected).abs().max().item() < TOL
    # the adapter does something, and every layer got a graph with expert-expert edges
    assert (got - eval_logits(base, ids, mask)).abs().max().item() > 1e-2
    for layer in model.gmoe_layers():
        adjacency = layer.router.expert_adjacency
        assert adjacency.any() and not adjacency.diagonal().any()


def test_gmoe_reference_graph_and_routing_matter(tmp_path):
    """The comparison is sensitive: without the expert-expert edges the published logits move."""
    base = tiny_model("llama")
    cfg, weights = write_published_gmoe(tmp_path / "adapter", base)
    ids, mask = token_ids()
    got = eval_logits(load_gmoe(copy.deepcopy(base), tmp_path / "adapter"), ids, mask)
    no_graph = eval_logits(published_model(base, cfg, weights, drop_graph=True), ids, mask)
    assert (got - no_graph).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", ["subset_dict_targets", "threshold_list_top1", "rslora_expert_only"])
def test_gmoe_reference_variants(tmp_path, variant):
    base = tiny_model("llama")
    if variant == "subset_dict_targets":
        targets = {"q_proj": True, "k_proj": False, "v_proj": True, "o_proj": False,
                   "w1_proj": True, "w2_proj": True, "w3_proj": False}
        cfg, weights = write_published_gmoe(tmp_path / "a", base, target_modules=targets)
        cfg = {**cfg, "target_modules": [k for k, v in targets.items() if v]}
    elif variant == "threshold_list_top1":
        cfg, weights = write_published_gmoe(tmp_path / "a", base, edges_thresholds=[0.5], top_k=1,
                                            num_gcnlayer=3, balance_strategy="goe")
    else:
        cfg, weights = write_published_gmoe(tmp_path / "a", base, target_modules=["w1_proj", "w2_proj", "w3_proj"],
                                            use_rslora=True)
        cfg = {**cfg, "lora_alpha": cfg["lora_alpha"] * cfg["r"] ** 0.5}  # rsLoRA: alpha / sqrt(r)
    ids, mask = token_ids()
    expected = eval_logits(published_model(base, cfg, weights), ids, mask)
    got = eval_logits(load_gmoe(copy.deepcopy(base), tmp_path / "a"), ids, mask)
    assert (got - expected).abs().max().item() < TOL


def test_published_expert_graph_threshold_rule():
    g = torch.Generator().manual_seed(3)
    E, H, G = 8, 12, 10
    X, W = torch.randn(E, H, generator=g), torch.randn(G, H, generator=g)
    act = ACT2FN["silu"]
    for threshold in (0.15, 0.25, 0.5, 1.0):
        adjacency = published_expert_graph(X, W, act, threshold)
        reference = torch.zeros(E, E, dtype=torch.bool)
        edges = published_edge_list(X, W, act, threshold)
        experts = (edges < E).all(0)
        reference[edges[0, experts], edges[1, experts]] = True
        reference.fill_diagonal_(False)
        assert torch.equal(adjacency, reference)
        assert torch.equal(adjacency, adjacency.t())
        assert (adjacency.sum().item() + E) / E ** 2 >= threshold
    assert published_expert_graph(X, W, act, 1.0).sum() == E * (E - 1)
    with pytest.raises(ValueError, match="edges_thresholds"):
        published_expert_graph(X, W, act, 1.5)


def test_gmoe_reference_twins_are_kept_and_named(tmp_path):
    base = tiny_model("llama")
    cfg, weights = write_published_gmoe(tmp_path / "a", base, edges_thresholds=0.2)
    for i in range(2):  # experts 0 and 1 alike: their edge comes first, and they share neighbours
        weights[f"mixlora.layers.{i}.gate.X"][1] = weights[f"mixlora.layers.{i}.gate.X"][0] * 1.001
    save_adapter(tmp_path / "a", cfg, weights)
    with pytest.warns(UserWarning, match=r"experts \[\(0, 1\).*twins"):
        model = from_published_gmoe(copy.deepcopy(base), tmp_path / "a")
    assert model.gmoe_layers()[0].router.expert_adjacency[0, 1]
    ids, mask = token_ids()
    expected = eval_logits(published_model(base, cfg, weights), ids, mask)
    assert (eval_logits(model, ids, mask) - expected).abs().max().item() < TOL


def test_gmoe_reference_config_is_faithful_and_roundtrips(tmp_path):
    base = tiny_model("qwen2")
    cfg, weights = write_published_gmoe(tmp_path / "a", base, lora_dropout=0.1)
    model = load_gmoe(copy.deepcopy(base), tmp_path / "a")
    c = model.gmoe_config
    assert (c.router, c.num_experts, c.top_k, c.r, c.lora_alpha, c.lora_dropout) == ("graph", 6, 2, 4, 8, 0.1)
    assert (c.gcn_layers, c.gcn_dim, c.poisson_loss_coef, c.normal_loss_coef, c.aux_loss_coef) == (2, 16, 0.005, 8.0, 0)
    assert c.target_modules == list(ATTENTION) and c.expert_modules == ["gate_proj", "up_proj", "down_proj"]
    assert c.edge_density == pytest.approx((0.4 * 36 - 6) / 30)
    router = model.gmoe_layers()[1].router
    torch.testing.assert_close(router.token_weight, weights["mixlora.layers.1.gate.mlp.weight"])
    torch.testing.assert_close(router.expert_weight, weights["mixlora.layers.1.gate.mlp_struct.weight"])
    torch.testing.assert_close(router.score_weight, weights["mixlora.layers.1.gate.proj.weight"][0])
    assert router.poisson_rate.item() == 1.5 and router.normal_std.item() == 3.0
    ids, mask = token_ids()
    before = eval_logits(model, ids, mask)
    model.save_pretrained(tmp_path / "ours")
    reloaded = GMoEModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert torch.equal(reloaded.gmoe_layers()[0].router.expert_adjacency, model.gmoe_layers()[0].router.expert_adjacency)
    torch.testing.assert_close(eval_logits(reloaded, ids, mask), before, atol=0, rtol=0)
    # trainable further
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    layer = model.gmoe_layers()[0]
    assert layer.router.token_weight.grad.abs().sum() > 0 and layer.experts["down_proj"].lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("balance,router_loss,coefs", [
    ("mixtral", True, (0.0, 0.0, 0.005)), ("goe", False, (0.0, 0.0, 0.0))])
def test_gmoe_reference_loss_settings(tmp_path, balance, router_loss, coefs):
    base = tiny_model("llama")
    write_published_gmoe(tmp_path / "a", base, balance_strategy=balance, router_loss=router_loss)
    c = load_gmoe(base, tmp_path / "a").gmoe_config
    assert (c.poisson_loss_coef, c.normal_loss_coef, c.aux_loss_coef) == coefs


# ----------------------------------------------------------------------------- mixlora: logits

@pytest.mark.parametrize("family", FAMILIES)
def test_mixlora_logits_match_mixlora_package(tmp_path, family):
    base = tiny_model(family)
    write_mixlora(tmp_path / "adapter", base)
    ids, mask = token_ids()
    expected = eval_logits(mixlora_model(base, tmp_path / "adapter"), ids, mask)
    got = eval_logits(from_mixlora(copy.deepcopy(base), tmp_path / "adapter"), ids, mask)
    assert (got - expected).abs().max().item() < TOL
    assert (got - eval_logits(base, ids, mask)).abs().max().item() > 1e-2


@pytest.mark.parametrize("variant", ["subset_dict_targets", "top1_no_act_fn", "rslora", "expert_only_top3"])
def test_mixlora_variants(tmp_path, variant):
    base = tiny_model("llama")
    kwargs = {
        "subset_dict_targets": dict(target_modules={"q_proj": True, "v_proj": True, "k_proj": False,
                                                    "gate_proj": True, "down_proj": True, "up_proj": False}),
        "top1_no_act_fn": dict(top_k=1, act_fn="silu"),
        "rslora": dict(use_rslora=True, r=8, lora_alpha=16),
        "expert_only_top3": dict(target_modules=["gate_proj", "up_proj", "down_proj"], top_k=3, num_experts=5),
    }[variant]
    write_mixlora(tmp_path / "a", base, **kwargs)
    ids, mask = token_ids()
    expected = eval_logits(mixlora_model(base, tmp_path / "a"), ids, mask)
    if variant == "top1_no_act_fn":  # mixlora 0.2.3 itself needs act_fn; we fall back to the MLP's
        cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        del cfg["act_fn"]
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    got = eval_logits(from_mixlora(copy.deepcopy(base), tmp_path / "a"), ids, mask)
    assert (got - expected).abs().max().item() < TOL


def test_mixlora_config_is_faithful_and_roundtrips(tmp_path):
    base = tiny_model("mistral")
    _, weights = write_mixlora(tmp_path / "a", base, router_aux_loss_coef=0.01)
    model = from_mixlora(copy.deepcopy(base), tmp_path / "a")
    c = model.gmoe_config
    assert (c.router, c.num_experts, c.top_k, c.r, c.lora_alpha, c.lora_dropout) == ("linear", 6, 2, 4, 8, 0.05)
    assert (c.poisson_loss_coef, c.normal_loss_coef, c.aux_loss_coef) == (0.0, 0.0, 0.01)
    assert c.target_modules == list(ATTENTION) and c.expert_modules == ["gate_proj", "up_proj", "down_proj"]
    layer = model.gmoe_layers()[1]
    torch.testing.assert_close(layer.router.weight, weights["mixlora.layers.1.mlp.moe_gate.weight"])
    torch.testing.assert_close(layer.experts["up_proj"].lora_B[3], weights["mixlora.layers.1.mlp.up_proj.experts.3.lora_B.weight"])
    attn = model.base_model.model.layers[0].self_attn.o_proj
    assert isinstance(attn, LoRALinear)
    torch.testing.assert_close(attn.lora_A.weight, weights["mixlora.layers.0.self_attn.o_proj.lora_A.weight"])
    ids, mask = token_ids()
    before = eval_logits(model, ids, mask)
    model.save_pretrained(tmp_path / "ours")
    reloaded = GMoEModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    torch.testing.assert_close(eval_logits(reloaded, ids, mask), before, atol=0, rtol=0)
    reloaded.train()
    reloaded(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert reloaded.gmoe_layers()[0].router.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- errors

def _untouched(model):
    return not any(isinstance(m, (GMoEMLP, LoRALinear)) for m in model.modules()) and \
        all(p.requires_grad for p in model.parameters())


def test_wrong_kind_of_folder(tmp_path):
    base = tiny_model("llama")
    write_mixlora(tmp_path / "mix", base)
    write_published_gmoe(tmp_path / "goe", base)
    with pytest.raises(ValueError, match="from_mixlora"):
        from_published_gmoe(base, tmp_path / "mix")
    with pytest.raises(ValueError, match="from_published_gmoe"):
        from_mixlora(base, tmp_path / "goe")
    from_mixlora(copy.deepcopy(base), tmp_path / "mix").save_pretrained(tmp_path / "ours")
    for loader in (from_mixlora, from_published_gmoe):
        with pytest.raises(ValueError, match="GMoEModel.from_pretrained"):
            loader(base, tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        from_mixlora(base, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        from_mixlora(base, tmp_path / "nowhere")
    cfg = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    save_adapter(tmp_path / "mixtral", {**cfg, "routing_strategy": "mixtral"}, {})
    with pytest.raises(ValueError, match="routing_strategy 'mixlora' only"):
        from_mixlora(base, tmp_path / "mixtral")
    assert _untouched(base)


@pytest.mark.parametrize("fmt", ["gmoe", "mixlora"])
def test_missing_unexpected_and_misshapen_keys(tmp_path, fmt):
    base = tiny_model("llama")
    write, load = (write_published_gmoe, from_published_gmoe) if fmt == "gmoe" else (write_mixlora, from_mixlora)
    cfg, weights = write(tmp_path / "a", base)
    key = ("mixlora.layers.1.gate.mlp_struct.weight" if fmt == "gmoe"
           else "mixlora.layers.1.mlp.moe_gate.weight")
    expected_shape = tuple(weights[key].shape)

    def check(broken, pattern):
        save_adapter(tmp_path / "a", cfg, broken)
        with pytest.raises(ValueError, match=pattern):
            load(base, tmp_path / "a")
        assert _untouched(base)

    check({k: v for k, v in weights.items() if k != key}, rf"missing key {key} \({expected_shape[0]}, {expected_shape[1]}\)")
    bad = {**weights, key: torch.randn(expected_shape[0], 7)}
    check(bad, rf"{key} has shape \({expected_shape[0]}, 7\) .*expects \({expected_shape[0]}, {expected_shape[1]}\)")
    lora = next(k for k in weights if "experts.5" in k and "lora_A" in k)
    check({**weights, lora: weights[lora][:2]}, rf"{lora} has shape \(2, ")
    extra = "mixlora.layers.2.self_attn.q_proj.lora_A.weight"
    check({**weights, extra: torch.randn(4, 32)}, rf"unexpected key {extra} \(4, 32\)")
    check({**weights, "classifier": torch.randn(2, 32)}, "classification")
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="could not be read"):
        load(base, tmp_path / "a")
    assert _untouched(base)


@pytest.mark.parametrize("fmt,override,pattern", [
    ("mixlora", dict(jitter_noise=0.01), "jitter_noise"),
    ("mixlora", dict(use_dora=True), "DoRA"),
    ("mixlora", dict(act_fn="gelu"), "act_fn='gelu' differs"),
    ("mixlora", dict(act_fn="tanh"), "not supported"),
    ("mixlora", dict(expert_lora=dict(r=4, lora_alpha=16)), "expert_lora"),
    ("mixlora", dict(target_modules=["q_proj", "v_proj"]), "none of gate_proj"),
    ("mixlora", dict(target_modules=["q_proj", "fc1"]), "Phi"),
    ("mixlora", dict(top_k=7), "top_k"),
    ("gmoe", dict(target_modules=["q_proj", "v_proj"]), "none of w1_proj"),
    ("gmoe", dict(num_experts=[6, 4]), "differs across layers"),
    ("gmoe", dict(balance_strategy="switch"), "balance_strategy"),
    ("gmoe", dict(edges_thresholds=0.0), "edges_thresholds"),
    ("gmoe", dict(expert_lora=dict(r=4, lora_alpha=2)), "expert_lora"),
])
def test_inexpressible_configs_are_rejected(tmp_path, fmt, override, pattern):
    base = tiny_model("llama")
    write = write_published_gmoe if fmt == "gmoe" else write_mixlora
    load = from_published_gmoe if fmt == "gmoe" else from_mixlora
    write(tmp_path / "a", base, **override)
    with pytest.raises(ValueError, match=pattern):
        load(base, tmp_path / "a")
    assert _untouched(base)
