"""Reference twin of the graph router (DESIGN.md, "Graph router").

Node order: the E expert nodes first, the token node last (index E). Every token's graph
has the same normalised adjacency Â and the same expert rows in the first layer's input,
so layer 1 is a token-independent constant plus a rank-1 term in the token node:

  Â N^0 W_1^T = (Â[:, :E] P) W_1^T  +  Â[:, E] ⊗ (t W_1^T),   P = act(X W_exp^T)

No per-token graph or sparse matrix is built. Later layers are a dense (E+1)x(E+1) mix per
token (tiny: E ≤ 64). Everything runs in fp32 (fp64 for fp64 inputs); probabilities are a softmax in fp32.
"""
from __future__ import annotations

import torch

from ..activations import act, compute_dtype
from .routing import topk_route


def normalized_adjacency(expert_adjacency: torch.Tensor) -> torch.Tensor:
    """Â = D^-1/2 (A + I) D^-1/2 over E experts plus the token node, in fp32.

    expert_adjacency: (E, E) bool/0-1, symmetric, zero diagonal: the expert–expert edges.
    The token node (index E) is joined to every expert; every node has a self-loop.
    """
    num_experts = expert_adjacency.shape[0]
    a = torch.zeros(num_experts + 1, num_experts + 1, dtype=torch.float32,
                    device=expert_adjacency.device)
    a[:num_experts, :num_experts] = (expert_adjacency != 0).float()
    a[:num_experts, num_experts] = 1.0
    a[num_experts, :num_experts] = 1.0
    a.fill_diagonal_(1.0)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


class _Mix(torch.autograd.Function):
    """out = rows @ nodes for a small matrix of graph weights rows (n, m) and nodes (m, N).

    Backward: d nodes = rows^T d out, d rows = d out nodes^T. The same as autograd's mm, but
    with rows^T copied to a contiguous (m, n) matrix first: ATen's CPU GEMM with a transposed
    tiny first operand ((9, 8)^T times (8, 131072), the router's graph mix at SmolLM2 size)
    ran 5x slower than with a contiguous one.
    """

    @staticmethod
    def forward(ctx, rows, nodes):
        # nodes (m, T·G) is kept only when the graph weights need a gradient (a fixed buffer
        # in the model): it is the largest tensor a router layer could save.
        ctx.save_for_backward(rows, nodes if ctx.needs_input_grad[0] else None)
        return rows @ nodes

    @staticmethod
    def backward(ctx, grad):
        rows, nodes = ctx.saved_tensors
        d_rows = grad @ nodes.t() if ctx.needs_input_grad[0] else None
        d_nodes = rows.t().contiguous() @ grad if ctx.needs_input_grad[1] else None
        return d_rows, d_nodes


def _mix(rows, nodes):
    if not torch.is_grad_enabled():   # decoding: the Function's bookkeeping would be pure overhead
        return rows @ nodes
    return _Mix.apply(rows, nodes)


def layer1_constant(expert_features, expert_weight, adjacency, gcn_weight, activation: str,
                    compute: torch.dtype = torch.float32) -> torch.Tensor:
    """C1 = (Â[:, :E] P) W_1^T, P = act(X W_exp^T): the token-independent part of layer 1,
    (E+1, G) in `compute`. Every backend's router computes it with these ops, so a C1 computed
    once (the model's eval cache) gives the same bits as one computed per call."""
    num_experts = expert_features.shape[0]
    expert_nodes = act(activation, expert_features.to(compute) @ expert_weight.to(compute).t())  # (E, G)
    adj = adjacency.detach().to(compute)
    return (adj[:, :num_experts] @ expert_nodes) @ gcn_weight[0].to(compute).t()


def token_readout(x, query_weight) -> torch.Tensor:
    """q_t = W_q x_t (T, G) in x's compute dtype: each token's readout vector under the
    token-readout option (`graph_router`'s `query_weight`). Every backend forms it with these ops."""
    compute = compute_dtype(x)
    return x.to(compute) @ query_weight.to(compute).t()


def router_logits(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                  score_weight, activation: str, constant=None, query_weight=None) -> torch.Tensor:
    """Expert logits (T, E) fp32 of the graph router; see `graph_router` for shapes.

    Nodes are held node-major, (nodes, T, G): the graph mix of a layer is then one 2-D GEMM
    on a (nodes, T·G) view and the layer's weight one 2-D GEMM on (nodes·T, G), with no
    transposed copies. The last layer computes the E expert rows only (the token node's own
    row is scored by nobody), which saves 1/(E+1) of its GEMM. `constant`: layer 1's C1
    from `layer1_constant` when the caller has it (then X and W_exp are not read).
    `query_weight` W_q (G, H), with score_weight None: the logits read the expert states against
    each token's own vector, ℓ_ti = ⟨N^L_ti, W_q x_t⟩ (`token_readout`), instead of w_p:
    ℓ_ti = ⟨N^L_ti, w_p⟩.
    """
    compute = compute_dtype(x)
    num_experts = expert_features.shape[0]
    num_layers = gcn_weight.shape[0]
    adj = adjacency.to(compute)
    token_node = act(activation, x.to(compute) @ token_weight.to(compute).t())                 # (T, G)
    num_tokens, width = token_node.shape
    nodes = None
    for layer in range(num_layers):
        w = gcn_weight[layer].to(compute)
        rows = adj[:num_experts] if layer == num_layers - 1 else adj  # which nodes this layer outputs
        if layer == 0:
            if constant is None:
                expert_nodes = act(activation, expert_features.to(compute) @ expert_weight.to(compute).t())
                constant = (rows[:, :num_experts] @ expert_nodes) @ w.t()             # (n, G)
            else:
                constant = constant[:rows.shape[0]]
            token_term = _mix(rows[:, num_experts:], (token_node @ w.t()).view(1, -1))  # (n, T·G)
            pre = constant[:, None, :] + token_term.view(-1, num_tokens, width)          # (n, T, G)
        else:
            # 2-D GEMMs only: einsum/matmul on 3-D operands pick kernels by requires_grad,
            # which would make frozen and trainable copies of a router differ in the last bit.
            mixed = _mix(rows, nodes.view(nodes.shape[0], num_tokens * width))        # (n, T·G)
            pre = (mixed.view(-1, width) @ w.t()).view(rows.shape[0], num_tokens, width)
        nodes = act(activation, pre)
    if query_weight is not None:  # (elementwise and a sum over G: no 3-D matmul, see above)
        readout = token_readout(x, query_weight)                                       # (T, G)
        return (nodes * readout[None]).sum(-1).t()
    return (nodes.view(-1, width) @ score_weight.to(compute)).view(num_experts, num_tokens).t()


def graph_router(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                 score_weight, top_k: int, activation: str, constant=None, query_weight=None):
    """Reference backend of `gmoe_kernels.functional.graph_router` (see there for shapes)."""
    logits = router_logits(x, token_weight, expert_weight, expert_features, adjacency,
                           gcn_weight, score_weight, activation, constant, query_weight)
    probs = torch.softmax(logits, dim=-1)
    indices, weights = topk_route(probs, top_k)
    return logits, probs, indices, weights
