"""gmoe.convert: adapters of the published GMoE code and of the mixlora package give their logits.

Adapters are written here in each format with random non-zero weights for tiny Llama, Qwen2
and Mistral models, loaded with gmoe.convert, and compared (fp32, eval mode) with:
- MixLoRA: the `mixlora` package itself, loading the same folder onto a copy of the base model;
- published GMoE: `PublishedGoEMoE` below, an independent transcription of the published forward
  (BAI-LAB/GMoE on mLoRA 0.3.2: GoEgate + GraphSparseMoe + LlamaMLP._mixlora_forward): the
  graph built from an edge list the way `GoEgate.get_edges` builds it, one (E+1)-node graph per
  token, GCN normalisation D^-1/2 (A with the diagonal set to 1) D^-1/2, run either densely or
  with PyTorch Geometric's `GCNConv` (when installed), then a per-expert loop.
"""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from gmoe import GMoEModel
from gmoe.convert import from_published_gmoe, from_mixlora, published_expert_graph
from gmoe.layers import GMoEMLP, LoRALinear
from tests.models import tiny_model

FAMILIES = ("llama", "qwen2", "mistral")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLORA = {"gate_proj": "w1_proj", "up_proj": "w3_proj", "down_proj": "w2_proj"}
TOL = 1e-4  # max abs difference of logits, fp32
SMALL_GMOE = dict(num_experts=6, top_k=2, r=4, lora_alpha=8, num_gcnlayer=2, dim_gcn=16, edges_thresholds=0.4)


def _ids(vocab=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _logits(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _shapes(base, i):
    mlp = base.model.layers[i].mlp
    hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
    return hidden, {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def _lora_pair(g, r, in_f, out_f, scale=0.25):
    return torch.randn(r, in_f, generator=g) * scale, torch.randn(out_f, r, generator=g) * scale


# ----------------------------------------------------------------------------- writers

def write_published_gmoe(folder, base, *, target_modules=None, seed=0, **overrides):
    """An adapter folder as the published code's save_adapter_weight writes it (no balance_strategy)."""
    cfg = dict(bias="none", peft_type="MIXLORA", r=4, lora_alpha=8, lora_dropout=0.05,
               target_modules=target_modules or [*ATTENTION, "w1_proj", "w2_proj", "w3_proj"],
               routing_strategy="goe", num_experts=6, batch_size=16, micro_batch_size=8, top_k=2,
               num_gcnlayer=2, edges_thresholds=0.4, dim_gcn=16, router_route_loss_coef_=0.005,
               router_count_loss_coef_=8.0, base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    cfg.update(overrides)
    g = torch.Generator().manual_seed(seed)
    E = cfg["num_experts"] if isinstance(cfg["num_experts"], int) else cfg["num_experts"][0]
    G, L, r = cfg["dim_gcn"], cfg["num_gcnlayer"], cfg["r"]
    targets = cfg["target_modules"] if isinstance(cfg["target_modules"], list) else \
        [k for k, v in cfg["target_modules"].items() if v]
    weights = {}
    for i, layer in enumerate(base.model.layers):
        hidden, shapes = _shapes(base, i)
        pre = f"mixlora.layers.{i}."
        weights[pre + "gate.X"] = torch.randn(E, hidden, generator=g) * 0.3
        weights[pre + "gate.mlp.weight"] = torch.randn(G, hidden, generator=g) * 2.0 * hidden ** -0.5
        weights[pre + "gate.mlp_struct.weight"] = torch.randn(G, hidden, generator=g) * hidden ** -0.5
        weights[pre + "gate.proj.weight"] = torch.randn(1, G, generator=g) * 3.0 * G ** -0.5
        for l in range(L):
            weights[pre + f"gate.convs.{l}.lin.weight"] = torch.randn(G, G, generator=g) * 1.5 * G ** -0.5
        weights[pre + "gate.lamb"] = torch.tensor(1.5)
        weights[pre + "gate.theta"] = torch.tensor([E / 2])
        for proj, (in_f, out_f) in shapes.items():
            if MLORA[proj] in targets:
                for e in range(E):
                    a, b = _lora_pair(g, r, in_f, out_f)
                    weights[pre + f"experts.{e}.{MLORA[proj]}.lora_A.weight"] = a
                    weights[pre + f"experts.{e}.{MLORA[proj]}.lora_B.weight"] = b
        for proj in ATTENTION:
            if proj in targets:
                lin = getattr(layer.self_attn, proj)
                a, b = _lora_pair(g, r, lin.in_features, lin.out_features)
                weights[pre + f"self_attn.{proj}.lora_A.weight"] = a
                weights[pre + f"self_attn.{proj}.lora_B.weight"] = b
    _save(folder, cfg, weights)
    return cfg, weights


def write_mixlora(folder, base, *, target_modules=None, seed=0, **overrides):
    """An adapter folder in the mixlora package's format (what MixLoraConfig.export + its weights give)."""
    cfg = dict(bias="none", peft_type="MIXLORA", task_type="CAUSAL_LM", base_model_name_or_path="tiny",
               r=4, lora_alpha=8, lora_dropout=0.05,
               target_modules=target_modules or [*ATTENTION, "gate_proj", "up_proj", "down_proj"],
               routing_strategy="mixlora", num_experts=6, top_k=2, act_fn="silu")
    cfg.update(overrides)
    g = torch.Generator().manual_seed(seed)
    E, r = cfg["num_experts"], cfg["r"]
    targets = cfg["target_modules"] if isinstance(cfg["target_modules"], list) else \
        [k for k, v in cfg["target_modules"].items() if v]
    weights = {}
    for i, layer in enumerate(base.model.layers):
        hidden, shapes = _shapes(base, i)
        pre = f"mixlora.layers.{i}."
        weights[pre + "mlp.moe_gate.weight"] = torch.randn(E, hidden, generator=g) * 0.5
        for proj, (in_f, out_f) in shapes.items():
            if proj in targets:
                for e in range(E):
                    a, b = _lora_pair(g, r, in_f, out_f)
                    weights[pre + f"mlp.{proj}.experts.{e}.lora_A.weight"] = a
                    weights[pre + f"mlp.{proj}.experts.{e}.lora_B.weight"] = b
        for proj in ATTENTION:
            if proj in targets:
                lin = getattr(layer.self_attn, proj)
                a, b = _lora_pair(g, r, lin.in_features, lin.out_features)
                weights[pre + f"self_attn.{proj}.lora_A.weight"] = a
                weights[pre + f"self_attn.{proj}.lora_B.weight"] = b
    _save(folder, cfg, weights)
    return cfg, weights


def _save(folder, cfg, weights):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=4))
    torch.save(weights, folder / "adapter_model.bin")


def _load_gmoe(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # twins in the published graph are reported, not errors
        return from_published_gmoe(base, folder)


# ----------------------------------------------------------------------------- published forward, transcribed

def published_edge_list(X, w_struct, act, threshold):
    """GoEgate.get_edges for one token: expert pairs by the |cos| threshold rule + token edges both ways."""
    E = X.shape[0]
    feats = F.normalize(act(X @ w_struct.t()), p=2, dim=1)
    sim = feats @ feats.t()
    y, perc, mask = 1.0, 0.0, None
    while perc < threshold:
        mask = torch.abs(sim) >= y
        perc = torch.sum(mask).item() / (E * E)
        y -= 0.01
    edges = torch.nonzero(mask).t()
    experts = torch.arange(E).unsqueeze(0)
    token = torch.full((1, E), E)
    edges = torch.cat([edges, torch.cat([experts, token]), torch.cat([token, experts])], dim=1)
    return edges.long()


def gcn_matrix(edges, num_nodes):
    """gcn_norm of the SparseTensor adj_t(row=edges[0], col=edges[1]): fill_diag(1), D^-1/2 A D^-1/2."""
    a = torch.zeros(num_nodes, num_nodes)
    a[edges[0], edges[1]] = 1.0
    a.fill_diagonal_(1.0)
    d = a.sum(1).pow(-0.5)
    return d[:, None] * a * d[None, :]


class PublishedLoRA(nn.Module):
    """mLoRA's Lora.forward in eval mode: residual + B(A(x)) * scaling."""

    def __init__(self, base, a, b, scaling):
        super().__init__()
        self.base, self.a, self.b, self.scaling = base, a, b, scaling

    def forward(self, x):
        return self.base(x) + (x.float() @ self.a.t() @ self.b.t() * self.scaling).to(x.dtype)


class PublishedGoEMoE(nn.Module):
    """GraphSparseMoe.forward (GoEgate router, softmax, top-k renormalised, per-expert LoRA loop)."""

    def __init__(self, mlp, act, weights, layer, cfg, gcn="dense", drop_graph=False):
        super().__init__()
        pre = f"mixlora.layers.{layer}."
        self.mlp, self.act, self.gcn = mlp, act, gcn
        self.E, self.K = cfg["num_experts"], cfg["top_k"]
        self.scaling = cfg["lora_alpha"] / cfg["r"]
        self.w = {k[len(pre):]: v for k, v in weights.items() if k.startswith(pre)}
        self.convs = [self.w[f"gate.convs.{l}.lin.weight"] for l in range(cfg["num_gcnlayer"])]
        thr = cfg["edges_thresholds"]
        thr = thr if isinstance(thr, float) else thr[layer // 8]
        self.edges = published_edge_list(self.w["gate.X"], self.w["gate.mlp_struct.weight"], act, thr)
        if drop_graph:  # keep only the token edges: used to show the graph matters
            self.edges = self.edges[:, (self.edges == self.E).any(0)]

    def router_logits(self, x):
        E, T = self.E, x.shape[0]
        tok = self.act(x @ self.w["gate.mlp.weight"].t())
        exp = self.act(self.w["gate.X"] @ self.w["gate.mlp_struct.weight"].t())
        nodes = torch.cat([exp.unsqueeze(0).expand(T, E, exp.shape[1]), tok.unsqueeze(1)], dim=1)
        if self.gcn == "dense":
            adj = gcn_matrix(self.edges, E + 1)
            for w in self.convs:
                nodes = self.act(torch.einsum("ij,tjg->tig", adj, nodes @ w.t()))
        else:  # PyTorch Geometric, one graph of T * (E+1) nodes, as the published code batches it
            from torch_geometric.nn import GCNConv
            flat = nodes.reshape(T * (E + 1), -1)
            batched = torch.cat([self.edges + t * (E + 1) for t in range(T)], dim=1)
            edge_index = batched.flip(0)  # adj_t[row, col] = message col -> row
            for w in self.convs:
                conv = GCNConv(w.shape[1], w.shape[0], bias=False)
                with torch.no_grad():
                    conv.lin.weight.copy_(w)
                flat = self.act(conv(flat, edge_index))
            nodes = flat.view(T, E + 1, -1)
        return (nodes @ self.w["gate.proj.weight"].t()).squeeze(-1)[:, :E]

    def expert(self, e, x):
        m, s, w = self.mlp, self.scaling, self.w

        def lora(name, base_out, inp):
            a, b = w.get(f"experts.{e}.{name}.lora_A.weight"), w.get(f"experts.{e}.{name}.lora_B.weight")
            return base_out if a is None else base_out + (inp @ a.t() @ b.t()) * s

        g = lora("w1_proj", m.gate_proj(x), x)
        u = lora("w3_proj", m.up_proj(x), x)
        h = self.act(g) * u
        return lora("w2_proj", m.down_proj(h), h)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).float()
        probs = torch.softmax(self.router_logits(x), dim=-1)
        weights, selected = torch.topk(probs, self.K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, self.E).permute(2, 1, 0)
        for e in range(self.E):
            slot, tok = torch.where(mask[e])
            out.index_add_(0, tok, self.expert(e, x[tok]) * weights[tok, slot, None])
        return out.view(shape).to(hidden_states.dtype)


def published_model(base, cfg, weights, gcn="dense", drop_graph=False):
    model = copy.deepcopy(base)
    act = ACT2FN[model.config.hidden_act]
    targets = cfg["target_modules"]
    scaling = cfg["lora_alpha"] / cfg["r"]
    for i, layer in enumerate(model.model.layers):
        layer.mlp = PublishedGoEMoE(layer.mlp, act, weights, i, cfg, gcn, drop_graph)
        for proj in ATTENTION:
            if proj in targets:
                pre = f"mixlora.layers.{i}.self_attn.{proj}."
                setattr(layer.self_attn, proj, PublishedLoRA(getattr(layer.self_attn, proj),
                                                             weights[pre + "lora_A.weight"],
                                                             weights[pre + "lora_B.weight"], scaling))
    return model.eval()


def mixlora_model(base, folder):
    """The mixlora package's own loader on a copy of `base`, in eval mode.

    mixlora keeps its MoE layers and expert LoRAs in plain dicts (not submodules), so
    model.eval() does not reach their dropout: switch them to eval explicitly.
    """
    from mixlora import inject_adapter_in_model, load_adapter_weights
    model = copy.deepcopy(base)
    config, weights = load_adapter_weights(str(folder), device="cpu", dtype=torch.float32)
    inject_adapter_in_model(model, config, weights)
    model.eval()
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            moe.eval()
            for lora in moe.experts_.values():
                lora.eval()
    return model


# ----------------------------------------------------------------------------- published GMoE: logits

@pytest.mark.parametrize("gcn", ["dense", "pyg"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gmoe_reference_logits_match_published_forward(tmp_path, family, gcn):
    if gcn == "pyg":
        pytest.importorskip("torch_geometric")
    base = tiny_model(family)
    cfg, weights = write_published_gmoe(tmp_path / "adapter", base)
    ids, mask = _ids()
    expected = _logits(published_model(base, cfg, weights, gcn), ids, mask)
    model = _load_gmoe(copy.deepcopy(base), tmp_path / "adapter")
    got = _logits(model, ids, mask)
    assert (got - expected).abs().max().item() < TOL
    # the adapter does something, and every layer got a graph with expert-expert edges
    assert (got - _logits(base, ids, mask)).abs().max().item() > 1e-2
    for layer in model.gmoe_layers():
        adjacency = layer.router.expert_adjacency
        assert adjacency.any() and not adjacency.diagonal().any()


def test_gmoe_reference_graph_and_routing_matter(tmp_path):
    """The comparison is sensitive: without the expert-expert edges the published logits move."""
    base = tiny_model("llama")
    cfg, weights = write_published_gmoe(tmp_path / "adapter", base)
    ids, mask = _ids()
    got = _logits(_load_gmoe(copy.deepcopy(base), tmp_path / "adapter"), ids, mask)
    no_graph = _logits(published_model(base, cfg, weights, drop_graph=True), ids, mask)
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
    ids, mask = _ids()
    expected = _logits(published_model(base, cfg, weights), ids, mask)
    got = _logits(_load_gmoe(copy.deepcopy(base), tmp_path / "a"), ids, mask)
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
    _save(tmp_path / "a", cfg, weights)
    with pytest.warns(UserWarning, match=r"experts \[\(0, 1\).*twins"):
        model = from_published_gmoe(copy.deepcopy(base), tmp_path / "a")
    assert model.gmoe_layers()[0].router.expert_adjacency[0, 1]
    ids, mask = _ids()
    expected = _logits(published_model(base, cfg, weights), ids, mask)
    assert (_logits(model, ids, mask) - expected).abs().max().item() < TOL


def test_gmoe_reference_config_is_faithful_and_roundtrips(tmp_path):
    base = tiny_model("qwen2")
    cfg, weights = write_published_gmoe(tmp_path / "a", base, lora_dropout=0.1)
    model = _load_gmoe(copy.deepcopy(base), tmp_path / "a")
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
    ids, mask = _ids()
    before = _logits(model, ids, mask)
    model.save_pretrained(tmp_path / "ours")
    reloaded = GMoEModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert torch.equal(reloaded.gmoe_layers()[0].router.expert_adjacency, model.gmoe_layers()[0].router.expert_adjacency)
    torch.testing.assert_close(_logits(reloaded, ids, mask), before, atol=0, rtol=0)
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
    c = _load_gmoe(base, tmp_path / "a").gmoe_config
    assert (c.poisson_loss_coef, c.normal_loss_coef, c.aux_loss_coef) == coefs


# ----------------------------------------------------------------------------- mixlora: logits

@pytest.mark.parametrize("family", FAMILIES)
def test_mixlora_logits_match_mixlora_package(tmp_path, family):
    base = tiny_model(family)
    write_mixlora(tmp_path / "adapter", base)
    ids, mask = _ids()
    expected = _logits(mixlora_model(base, tmp_path / "adapter"), ids, mask)
    got = _logits(from_mixlora(copy.deepcopy(base), tmp_path / "adapter"), ids, mask)
    assert (got - expected).abs().max().item() < TOL
    assert (got - _logits(base, ids, mask)).abs().max().item() > 1e-2


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
    ids, mask = _ids()
    expected = _logits(mixlora_model(base, tmp_path / "a"), ids, mask)
    if variant == "top1_no_act_fn":  # mixlora 0.2.3 itself needs act_fn; we fall back to the MLP's
        cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        del cfg["act_fn"]
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    got = _logits(from_mixlora(copy.deepcopy(base), tmp_path / "a"), ids, mask)
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
    ids, mask = _ids()
    before = _logits(model, ids, mask)
    model.save_pretrained(tmp_path / "ours")
    reloaded = GMoEModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    torch.testing.assert_close(_logits(reloaded, ids, mask), before, atol=0, rtol=0)
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
    _save(tmp_path / "mixtral", {**cfg, "routing_strategy": "mixtral"}, {})
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
        _save(tmp_path / "a", cfg, broken)
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
