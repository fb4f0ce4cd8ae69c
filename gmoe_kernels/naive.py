"""Naive twins: the literal per-expert (and per-token) computation, the tests' oracle.

This is what MixLoRA / GMoE (mLoRA 0.3.2) run: for each expert, gather its tokens, apply
the full expert FFN (frozen W_g, W_u *and* W_d plus that expert's LoRAs) to those rows,
and index-add the weighted result back. The frozen down projection therefore runs K
times per token. Kept apart from the fast path on purpose: tests compare against it,
benchmarks time it. Plain autograd; not used by the model layer. (The optimised
PyTorch backend is gmoe_kernels.reference; this module is the specification written plainly.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import act


def expert_ffn_loop(x, gate_weight, up_weight, down_weight, lora_a_gate, lora_b_gate,
                    lora_a_up, lora_b_up, lora_a_down, lora_b_down, indices, weights,
                    scaling: float, activation: str, gate_bias=None, up_bias=None,
                    down_bias=None):
    """Same signature and result as `gmoe_kernels.functional.expert_ffn`."""
    out = torch.zeros_like(x)
    for e in range(lora_a_gate.shape[0]):
        token_ids, slot = torch.where(indices == e)
        if token_ids.numel() == 0:
            continue
        rows = x[token_ids]
        w = weights[token_ids, slot].unsqueeze(1).to(x.dtype)
        g = F.linear(rows, gate_weight, gate_bias) + scaling * (rows @ lora_a_gate[e].t()) @ lora_b_gate[e].t()
        u = F.linear(rows, up_weight, up_bias) + scaling * (rows @ lora_a_up[e].t()) @ lora_b_up[e].t()
        h = act(activation, g) * u
        y = F.linear(h, down_weight, down_bias) + scaling * (h @ lora_a_down[e].t()) @ lora_b_down[e].t()
        out = out.index_add(0, token_ids, w * y)
    return out


def graph_router_loop(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                      score_weight, activation: str) -> torch.Tensor:
    """Logits (T, E): one explicit dense (E+1)-node GCN per token, written plainly."""
    num_experts = expert_features.shape[0]
    expert_nodes = act(activation, expert_features @ expert_weight.t())
    logits = []
    for t in range(x.shape[0]):
        token_node = act(activation, x[t] @ token_weight.t())
        nodes = torch.cat([expert_nodes, token_node[None]], dim=0)    # (E+1, G)
        for layer in range(gcn_weight.shape[0]):
            nodes = act(activation, adjacency @ nodes @ gcn_weight[layer].t())
        logits.append(nodes[:num_experts] @ score_weight)
    return torch.stack(logits)
