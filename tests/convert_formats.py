"""Adapters in the published GMoE and the mixlora formats, written with random non-zero weights, and
an independent transcription of the published GMoE forward (BAI-LAB/GMoE on mLoRA 0.3.2: GoEgate +
GraphSparseMoe + LlamaMLP._mixlora_forward), for tests/test_convert.py."""
import copy
import json
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from gmoe.convert import from_published_gmoe

FAMILIES = ("llama", "qwen2", "mistral")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLORA = {"gate_proj": "w1_proj", "up_proj": "w3_proj", "down_proj": "w2_proj"}
TOL = 1e-4  # max abs difference of logits, fp32
SMALL_GMOE = dict(num_experts=6, top_k=2, r=4, lora_alpha=8, num_gcnlayer=2, dim_gcn=16, edges_thresholds=0.4)


def token_ids(vocab=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def eval_logits(model, ids, mask):
    """Eval logits at the real tokens (zeros at padding): GMoE routes no padding token, so its
    padding positions hold the base MLP's output, where the other implementations route them."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits * mask[..., None]


def layer_shapes(base, i):
    mlp = base.model.layers[i].mlp
    hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
    return hidden, {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def lora_pair(g, r, in_f, out_f, scale=0.25):
    return torch.randn(r, in_f, generator=g) * scale, torch.randn(out_f, r, generator=g) * scale


# ----------------------------------------------------------------------------- writers

def add_lora_pairs(weights, g, r, in_f, out_f, prefixes):
    """One random LoRA pair per prefix: weights[prefix + "lora_A.weight"], [prefix + "lora_B.weight"]."""
    for prefix in prefixes:
        weights[prefix + "lora_A.weight"], weights[prefix + "lora_B.weight"] = lora_pair(g, r, in_f, out_f)


def add_attention_loras(weights, g, r, layer, targets, pre):
    """LoRA pairs on the attention projections named in `targets`, as `<pre>self_attn.<proj>.lora_A/B`."""
    for proj in ATTENTION:
        if proj in targets:
            lin = getattr(layer.self_attn, proj)
            add_lora_pairs(weights, g, r, lin.in_features, lin.out_features, [pre + f"self_attn.{proj}."])


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
        hidden, shapes = layer_shapes(base, i)
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
                add_lora_pairs(weights, g, r, in_f, out_f, [pre + f"experts.{e}.{MLORA[proj]}." for e in range(E)])
        add_attention_loras(weights, g, r, layer, targets, pre)
    save_adapter(folder, cfg, weights)
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
        hidden, shapes = layer_shapes(base, i)
        pre = f"mixlora.layers.{i}."
        weights[pre + "mlp.moe_gate.weight"] = torch.randn(E, hidden, generator=g) * 0.5
        for proj, (in_f, out_f) in shapes.items():
            if proj in targets:
                add_lora_pairs(weights, g, r, in_f, out_f, [pre + f"mlp.{proj}.experts.{e}." for e in range(E)])
        add_attention_loras(weights, g, r, layer, targets, pre)
    save_adapter(folder, cfg, weights)
    return cfg, weights


def save_adapter(folder, cfg, weights):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=4))
    torch.save(weights, folder / "adapter_model.bin")


def load_gmoe(base, folder):
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


