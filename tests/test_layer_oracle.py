"""A whole GMoE layer (router + experts + losses) against the literal per-expert computation.

Outputs and gradients of every trainable tensor: x, every LoRA A/B, the router weights,
the Poisson rate and the Normal std; float64 and float32; the graph router, and the linear
router with all three losses (Poisson, Normal and Switch) on.
"""
import pytest
import torch
import transformers

import gmoe
from gmoe import losses
from gmoe_kernels.naive import expert_ffn_loop, graph_router_loop
from gmoe_kernels.reference import normalized_adjacency
from tests.tolerances import assert_close


def _layer(dtype, router="graph"):
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    base = transformers.LlamaForCausalLM(config).to(dtype)
    cfg = gmoe.GMoEConfig(num_experts=4, top_k=2, r=2, gcn_dim=8, edge_density=0.5, router=router,
                          target_modules=[], aux_loss_coef=0.01 if router == "linear" else 0.0)
    model = gmoe.get_gmoe_model(base, cfg).to(dtype)
    layer = model.gmoe_layers()[0]
    with torch.no_grad():
        for name, p in layer.named_parameters():  # random weights; λ and σ keep their initial values
            if p.requires_grad and not name.endswith(("poisson_rate", "normal_std")):
                p.normal_(0, 0.3)
        if router == "graph":
            layer.router.token_weight.mul_(0.1)
    model.train()
    return model, layer


def _literal(layer, x, cfg, mask):
    mlp, ex, router = layer.base_layer, layer.experts, layer.router
    if cfg.router == "graph":
        logits = graph_router_loop(x, router.token_weight, router.expert_weight, router.expert_features,
                                   normalized_adjacency(router.expert_adjacency).to(x.dtype),
                                   router.gcn_weight, router.score_weight, layer.activation)
    else:
        logits = x @ router.weight.t()
    probs = torch.softmax(logits, -1)
    p_k, indices = torch.topk(probs, cfg.top_k)
    weights = p_k / p_k.sum(-1, keepdim=True)
    y = expert_ffn_loop(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                        ex["gate_proj"].lora_A, ex["gate_proj"].lora_B, ex["up_proj"].lora_A,
                        ex["up_proj"].lora_B, ex["down_proj"].lora_A, ex["down_proj"].lora_B,
                        indices, weights, cfg.scaling, layer.activation)
    # Every term whose coefficient is > 0, whichever the router (the linear router with the
    # GMoE losses is the paper's "no graph" ablation).
    loss = cfg.poisson_loss_coef * losses.poisson_distinction_loss(probs, router.poisson_rate, mask)
    load = layer.expert_load + cfg.top_k * losses.batch_load(p_k, indices, cfg.num_experts, mask)
    loss = loss + cfg.normal_loss_coef * losses.normal_balance_loss(load, router.normal_std)
    if cfg.aux_loss_coef > 0:
        loss = loss + cfg.aux_loss_coef * losses.switch_loss(probs, indices, mask)
    return y, loss


@pytest.mark.parametrize("router", ["graph", "linear"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_layer_and_losses_match_literal_oracle(dtype, router):
    model, layer = _layer(dtype, router)
    cfg = model.gmoe_config
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    params = [p for p in layer.parameters() if p.requires_grad]
    y_lit, loss_lit = _literal(layer, x.view(-1, 16), cfg, mask.view(-1).bool())
    y = layer(x)
    loss = model.router_loss(mask)
    assert_close(y.view(-1, 16), y_lit, name="y")
    assert_close(loss, loss_lit, name="router loss")
    dy = torch.randn_like(y_lit)
    total, total_lit = (y.view(-1, 16) * dy).sum() + loss, (y_lit * dy).sum() + loss_lit
    grads = torch.autograd.grad(total, [x] + params, allow_unused=True)
    grads_lit = torch.autograd.grad(total_lit, [x] + params, allow_unused=True)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, grads, grads_lit):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is None:
            continue
        assert_close(a, b, name=f"d{name}")
    assert grads[names.index("router.poisson_rate")].abs() > 0
    assert grads[names.index("router.normal_std")].abs() > 0
