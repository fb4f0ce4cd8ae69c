"""Triton backend of the graph router (DESIGN.md, "Graph router").

Split of the work, per forward:
  torch (autograd):  t  = act(x W_tok^T)                    (T, G)  token nodes
                     u  = t W_1^T                           (T, G)  layer-1 token term
                     P  = act(X W_exp^T)                    (E, G)  expert nodes, token-independent
                     C1 = (Â[:, :E] P) W_1^T                (E+1, G) layer-1 constant
  kernel (op `gmoe_kernels::graph_router_gcn`): per token, Z^1 = C1 + Â[:, E] ⊗ u,
                     Z^l = Â act(Z^{l-1}) W_l^T (l = 2..L), logits = act(Z^L)[:E] w_p,
                     probs = softmax(logits) in fp32 (fp64 for fp64 inputs)
  torch (autograd):  top-K of probs (torch.topk: its tie-breaking, exactly) and
                     weights = p_k / sum_k p_k.
The op outputs logits and probs; its backward (a second kernel, op
`gmoe_kernels::graph_router_gcn_backward`) returns dC1, du, dW_2..dW_L and dw_p, and torch
autograd carries dC1 and du back to x, W_tok, W_exp and W_1, and the weights' gradient
through the renormalisation and topk's gather to d probs. No per-token node state is kept
between forward and backward: the backward kernel recomputes Z^1..Z^L per token tile.

The adjacency Â is a frozen buffer: it is detached and receives no gradient. The expert
features X get their (exact) gradient through torch, since they only enter through C1.
Outputs of the kernels are filled with NaN first when GMOE_POISON=1 (tests), so that an
element a kernel fails to write shows up.

The token-readout option (`query_weight`) is a second op, `gmoe_kernels::graph_router_gcn_readout`,
on the same kernels with TOKEN_READOUT set: torch forms q = x W_q^T (T, G), the kernel reads
logits = N^L[:E] q_t per token, and its backward returns dq in place of dw_p.
"""
from __future__ import annotations

import torch
import triton

from ..activations import act, compute_dtype
from ..backend import interpreting
from ..checks import check_graph_router
from ..reference.graph_router import token_readout
from ..reference.routing import topk_route
from ..registration import DeprecatedFunction, register_differentiable_op
from ._common import device_guard, new_output, strides
from ._graph_router_kernels import _graph_router_bwd_kernel, _graph_router_fwd_kernel

__all__ = ["graph_router", "graph_router_gcn_backward", "graph_router_gcn_forward"]
# (graph_router_gcn_forward / _backward take readout= for the token-readout op)

_INTERPRETER_PROGRAMS = 2  # a small persistent grid, so tests run the multi-tile loop


def _config(num_experts: int, width: int, num_tokens: int, device: torch.device,
            backward: bool = False):
    """Block sizes, tokens per tile, grid size and pipelining (one fixed config; no autotune).

    BLOCK_M rows hold floor(BLOCK_M / (E+1)) tokens' (E+1) nodes each: 64 rows up to E+1 = 64
    (one token a tile beyond E+1 = 32), else next_pow2(E+1). BLOCK_N = BLOCK_K = 16 tile G.
    8 warps; the backward without software pipelining (num_stages 1). Per
    benchmarks/compile_gate.py these are spill-free at sm_90 and sm_80 up to E = 63; 128-row
    tiles spilled 0.2–3 KB per thread in every warp and stage count tried, so E ≥ 64 (not in the
    benchmark registry) still spills. Programs: a persistent grid of min(#tiles, 2 × #SMs)
    (1 × #SMs in the backward, whose partial rows hold L·G² each; 2 under the interpreter, so
    tests run the multi-tile loop); scratch is #programs × slots × BLOCK_M × G.
    """
    num_nodes = num_experts + 1
    block_m = max(64, triton.next_power_of_2(num_nodes))
    block_g = 16
    num_warps = 8
    if interpreting() or device.type == "cpu":
        max_programs = _INTERPRETER_PROGRAMS
        num_warps = 4
    else:
        max_programs = (1 if backward else 2) * _sm_count(device)
    tokens_per_tile = block_m // num_nodes
    num_tiles = triton.cdiv(num_tokens, tokens_per_tile)
    num_programs = max(1, min(num_tiles, max_programs))
    return dict(num_experts=num_experts, width=width, block_m=block_m, block_g=block_g,
                num_warps=num_warps, num_stages=1 if backward else 2,
                tokens_per_tile=tokens_per_tile, num_tiles=num_tiles, num_programs=num_programs)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (an H100/H200's 132 for a `meta` tensor, which
    benchmarks/compile_gate.py uses to capture GPU launches on a machine without one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def graph_router_gcn_forward(c1, token_proj, adjacency, gcn_weight, score_weight,
                             activation: str, readout=None):
    """Launch the forward kernel: the GCN layers, the score projection and the softmax.

    c1:           (E+1, G) fp32|fp64  (Â[:, :E] P) W_1^T, the token-independent layer-1 term
    token_proj:   (T, G) c1.dtype     u = t W_1^T, the token node's layer-1 term
    adjacency:    (E+1, E+1) c1.dtype Â, token node last
    gcn_weight:   (L, G, G) fp32|fp16|bf16|fp64  W_1 … W_L (layer 1 is not read here)
    score_weight: (G,) any float dtype            w_p (None with readout)
    activation:   canonical activation name (gmoe_kernels.activations.ACTIVATIONS)
    readout:      (T, G) c1.dtype, optional       q = x W_q^T, each token's readout in place of w_p
    Returns logits (T, E) and probs (T, E), both c1.dtype.
    """
    num_tokens, width = token_proj.shape
    num_experts = c1.shape[0] - 1
    logits = new_output((num_tokens, num_experts), c1.dtype, c1.device)
    probs = new_output((num_tokens, num_experts), c1.dtype, c1.device)
    if num_tokens == 0:
        return logits, probs
    cfg = _config(num_experts, width, num_tokens, c1.device)
    scratch = new_output((cfg["num_programs"], 2, cfg["block_m"], width), c1.dtype, c1.device)
    with device_guard(c1.device):
        _graph_router_fwd_kernel[(cfg["num_programs"],)](
            **_inputs(c1, token_proj, adjacency, gcn_weight, score_weight, readout),
            logits_ptr=logits, probs_ptr=probs, scratch_ptr=scratch,
            **strides("logits", logits, "te"), **strides("probs", probs, "te"),
            **strides("scratch", scratch, ("prog", "slot", "row")),
            **_launch_settings(cfg, num_tokens, gcn_weight, activation, readout))
    return logits, probs


def _inputs(c1, token_proj, adjacency, gcn_weight, score_weight, readout=None) -> dict:
    """Pointers and strides of the inputs both kernels read. The readout that is not used (w_p,
    or the token readout q) gets the other's pointer and zero strides: the kernel never reads it."""
    score_weight = readout[0] if score_weight is None else score_weight
    readout_args = (dict(readout_ptr=score_weight, stride_readout_t=0, stride_readout_g=0) if readout is None
                    else dict(readout_ptr=readout, **strides("readout", readout, "tg")))
    return dict(c1_ptr=c1, token_proj_ptr=token_proj, adjacency_ptr=adjacency,
                gcn_weight_ptr=gcn_weight, score_weight_ptr=score_weight,
                **strides("c1", c1, ("node", "g")), **strides("token_proj", token_proj, "tg"),
                **strides("adjacency", adjacency, ("row", "col")),
                **strides("gcn_weight", gcn_weight, ("layer", "out", "in")),
                **strides("score_weight", score_weight, "g"), **readout_args)


def _launch_settings(cfg, num_tokens, gcn_weight, activation, readout=None) -> dict:
    """Sizes, constexprs and launch options both kernels take."""
    return dict(num_tokens=num_tokens, num_experts=cfg["num_experts"], width=cfg["width"],
                tokens_per_tile=cfg["tokens_per_tile"], num_tiles=cfg["num_tiles"],
                NUM_LAYERS=gcn_weight.shape[0], ACTIVATION=activation,
                BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_g"], BLOCK_K=cfg["block_g"],
                TOKEN_READOUT=readout is not None,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def graph_router_gcn_backward(grad_logits, grad_probs, probs, c1, token_proj, adjacency,
                              gcn_weight, score_weight, activation: str, readout=None):
    """Launch the backward kernel (recomputes each tile's Z^1..Z^L; maths: `_autograd_backward`).

    grad_logits:  (T, E) float  dL/d logits (any strides, stride 0 included)
    grad_probs:   (T, E) float  dL/d probs
    probs:        (T, E) c1.dtype  the forward's probabilities
    c1, token_proj, adjacency, gcn_weight, score_weight, activation, readout: as in the forward.
    Returns d_c1 (E+1, G) c1.dtype, d_token_proj (T, G) c1.dtype,
            d_gcn_weight (L, G, G) gcn_weight.dtype (layer 1's slice is zero: W_1 only enters
            through c1 and token_proj, whose gradients torch carries back),
            d_score_weight (G,) score_weight.dtype, or with readout d_readout (T, G) c1.dtype.
    """
    num_tokens, width = token_proj.shape
    num_experts = c1.shape[0] - 1
    num_layers = gcn_weight.shape[0]
    dtype = c1.dtype
    d_token_proj = new_output((num_tokens, width), dtype, c1.device)
    d_readout = None if readout is None else new_output((num_tokens, width), dtype, c1.device)
    cfg = _config(num_experts, width, max(num_tokens, 1), c1.device, backward=True)
    # One partial row per program for the sums over tokens, summed below in a fixed order.
    programs = cfg["num_programs"] if num_tokens > 0 else 1
    d_c1 = torch.zeros((programs, *c1.shape), dtype=dtype, device=c1.device)
    d_gcn = torch.zeros((programs, *gcn_weight.shape), dtype=dtype, device=c1.device)
    d_score = torch.zeros((programs, width), dtype=dtype, device=c1.device)  # (unused with readout)
    if num_tokens > 0:
        scratch = new_output((cfg["num_programs"], num_layers + 2, cfg["block_m"], width),
                              dtype, c1.device)
        with device_guard(c1.device):
            _graph_router_bwd_kernel[(cfg["num_programs"],)](
                grad_logits_ptr=grad_logits, grad_probs_ptr=grad_probs, probs_ptr=probs,
                **_inputs(c1, token_proj, adjacency, gcn_weight, score_weight, readout),
                d_c1_ptr=d_c1, d_token_proj_ptr=d_token_proj, d_gcn_weight_ptr=d_gcn,
                d_score_weight_ptr=d_score, d_readout_ptr=d_token_proj if d_readout is None else d_readout,
                scratch_ptr=scratch,
                **strides("grad_logits", grad_logits, "te"),
                **strides("grad_probs", grad_probs, "te"), **strides("probs", probs, "te"),
                **strides("d_c1", d_c1, ("prog", "node", "g")),
                **strides("d_token_proj", d_token_proj, "tg"),
                **strides("d_gcn_weight", d_gcn, ("prog", "layer", "out", "in")),
                **strides("d_score_weight", d_score, ("prog", "g")),
                **strides("d_readout", d_token_proj if d_readout is None else d_readout, "tg"),
                **strides("scratch", scratch, ("prog", "slot", "row")),
                **_launch_settings(cfg, num_tokens, gcn_weight, activation, readout))
    if readout is not None:
        return d_c1.sum(0), d_token_proj, d_gcn.sum(0).to(gcn_weight.dtype), d_readout
    return (d_c1.sum(0), d_token_proj, d_gcn.sum(0).to(gcn_weight.dtype),
            d_score.sum(0).to(score_weight.dtype))


# ---- torch.library registration (gmoe_kernels.registration) ---------------------------------

def _forward(c1: torch.Tensor, token_proj: torch.Tensor, adjacency: torch.Tensor,
             gcn_weight: torch.Tensor, score_weight: torch.Tensor,
             activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return graph_router_gcn_forward(c1, token_proj, adjacency, gcn_weight, score_weight,
                                    activation)


def _forward_fake(c1, token_proj, adjacency, gcn_weight, score_weight, activation):
    shape = (token_proj.shape[0], c1.shape[0] - 1)
    return c1.new_empty(shape), c1.new_empty(shape)


def _backward(grad_logits: torch.Tensor, grad_probs: torch.Tensor, probs: torch.Tensor,
              c1: torch.Tensor, token_proj: torch.Tensor, adjacency: torch.Tensor,
              gcn_weight: torch.Tensor, score_weight: torch.Tensor, activation: str,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return graph_router_gcn_backward(grad_logits, grad_probs, probs, c1, token_proj, adjacency,
                                     gcn_weight, score_weight, activation)


def _backward_fake(grad_logits, grad_probs, probs, c1, token_proj, adjacency, gcn_weight,
                   score_weight, activation):
    return (torch.empty_like(c1), torch.empty_like(token_proj), torch.empty_like(gcn_weight),
            torch.empty_like(score_weight))


def _setup_context(ctx, inputs, output):
    c1, token_proj, adjacency, gcn_weight, score_weight, activation = inputs
    _, probs = output
    ctx.save_for_backward(c1, token_proj, adjacency, gcn_weight, score_weight, probs)
    ctx.activation = activation


def _output_grads(grad_logits, grad_probs, probs):
    """(dlogits, dprobs), a zero tensor for an output autograd gave no gradient (None)."""
    return tuple(torch.zeros_like(probs) if g is None else g for g in (grad_logits, grad_probs))


def _autograd_backward(ctx, grad_logits, grad_probs):
    """(C1, u, Â, W, w_p) -> (logits, probs): the kernel part of the graph router.

    Forward, per token t (rows i = 0..E-1 experts, i = E the token node):
      Z^1 = C1 + Â[:, E] ⊗ u_t,   Z^l = Â act(Z^{l-1}) W_l^T (l = 2..L),   N^l = act(Z^l)
      ℓ = N^L[:E] w_p,   p = softmax(ℓ)
    Backward, with gℓ = dL/dℓ and gp = dL/dp given:
      dℓ    = gℓ + p ⊙ (gp − ⟨gp, p⟩)                      (softmax backward)
      dw_p  = Σ_t N^L[:E]^T dℓ
      dZ^L  = (dℓ ⊗ w_p) ⊙ act'(Z^L) on the expert rows, 0 on the token row
      for l = L..2:  D^l = Â^T dZ^l,  dW_l = Σ_t D^{lT} N^{l-1},
                     dZ^{l-1} = (D^l W_l) ⊙ act'(Z^{l-1})
      dC1   = Σ_t dZ^1,   du_t = Σ_i Â[i, E] dZ^1[i]   (= (Â^T dZ^1)[E])
    W_1 gets no gradient here (its slice of dW is zero): it enters only through C1 and u,
    and torch autograd carries dC1 and du on to W_1, W_tok, W_exp, X and x. Â gets none
    (frozen buffer). Saved: C1, u, Â, W, w_p and probs (T·E); Z^l and N^l are recomputed
    per token tile by the backward kernel rather than saved (T·(E+1)·G per layer).
    dC1, dW and dw_p are reduced over tokens per program, then over programs in a fixed order
    (bitwise reproducible).
    """
    c1, token_proj, adjacency, gcn_weight, score_weight, probs = ctx.saved_tensors
    d_c1, d_u, d_gcn, d_score = _graph_router_gcn_backward_op(
        *_output_grads(grad_logits, grad_probs, probs), probs, c1, token_proj, adjacency, gcn_weight,
        score_weight, ctx.activation)
    return d_c1, d_u, None, d_gcn, d_score, None


_graph_router_gcn_op, _graph_router_gcn_backward_op = register_differentiable_op(
    "graph_router_gcn", forward=_forward, forward_fake=_forward_fake, backward=_backward,
    backward_fake=_backward_fake, setup_context=_setup_context,
    autograd_backward=_autograd_backward)

# The autograd.Function this module exported before; kept for one release (warns on use).
GraphRouterGCN = DeprecatedFunction("gmoe_kernels.triton.graph_router.GraphRouterGCN",
                                    _graph_router_gcn_op, "torch.ops.gmoe_kernels.graph_router_gcn")


# ---- the token-readout option: a second op on the same kernels ----------------------------

def _readout_forward(c1: torch.Tensor, token_proj: torch.Tensor, adjacency: torch.Tensor,
                     gcn_weight: torch.Tensor, readout: torch.Tensor,
                     activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return graph_router_gcn_forward(c1, token_proj, adjacency, gcn_weight, None, activation,
                                    readout=readout)


def _readout_forward_fake(c1, token_proj, adjacency, gcn_weight, readout, activation):
    return _forward_fake(c1, token_proj, adjacency, gcn_weight, None, activation)


def _readout_backward(grad_logits: torch.Tensor, grad_probs: torch.Tensor, probs: torch.Tensor,
                      c1: torch.Tensor, token_proj: torch.Tensor, adjacency: torch.Tensor,
                      gcn_weight: torch.Tensor, readout: torch.Tensor, activation: str,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return graph_router_gcn_backward(grad_logits, grad_probs, probs, c1, token_proj, adjacency,
                                     gcn_weight, None, activation, readout=readout)


def _readout_backward_fake(grad_logits, grad_probs, probs, c1, token_proj, adjacency, gcn_weight,
                           readout, activation):
    return (torch.empty_like(c1), torch.empty_like(token_proj), torch.empty_like(gcn_weight),
            torch.empty_like(readout))


def _readout_autograd_backward(ctx, grad_logits, grad_probs):
    """(C1, u, Â, W, q) -> (logits, probs) with each token's readout q_t in place of w_p.

    As `_autograd_backward`, with ℓ_t = N^L_t[:E] q_t: dZ^L = (dℓ ⊗ q_t) ⊙ act'(Z^L) on the
    expert rows, and in place of dw_p = Σ_t N^L[:E]^T dℓ the per-token dq_t = N^L_t[:E]^T dℓ_t
    (torch carries it on to W_q and x through q = x W_q^T). Saved: C1, u, Â, W, q and probs.
    """
    c1, token_proj, adjacency, gcn_weight, readout, probs = ctx.saved_tensors
    d_c1, d_u, d_gcn, d_readout = _graph_router_gcn_readout_backward_op(
        *_output_grads(grad_logits, grad_probs, probs), probs, c1, token_proj, adjacency, gcn_weight, readout, ctx.activation)
    return d_c1, d_u, None, d_gcn, d_readout, None


_graph_router_gcn_readout_op, _graph_router_gcn_readout_backward_op = register_differentiable_op(
    "graph_router_gcn_readout", forward=_readout_forward, forward_fake=_readout_forward_fake,
    backward=_readout_backward, backward_fake=_readout_backward_fake, setup_context=_setup_context,
    autograd_backward=_readout_autograd_backward)


# ---- public entry point ----------------------------------------------------------------

def graph_router(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                 score_weight, top_k: int, activation: str, constant=None, query_weight=None):
    """Triton backend of `gmoe_kernels.functional.graph_router` (same signature and results).

    x:               (T, H) fp32|fp16|bf16|fp64
    token_weight:    (G, H) W_tok;  expert_weight: (G, H) W_exp
    expert_features: (E, H) X (frozen)
    adjacency:       (E+1, E+1) Â, token node last (frozen: no gradient)
    gcn_weight:      (L, G, G) W_1 … W_L;  score_weight: (G,) w_p
    top_k:           K ≤ E;  activation: one of ACTIVATIONS (canonical names, as the
                     reference: map `transformers` aliases with `canonical_activation`)
    constant:        (E+1, G) C1 from `reference.layer1_constant` when the caller has it
                     (the model's eval cache); then X and W_exp are not read
    query_weight:    (G, H) W_q, with score_weight None: the token readout, ℓ_i = ⟨N^L_i, W_q x⟩
    Returns logits (T, E), probs (T, E), indices (T, K) int64, weights (T, K): fp32
    (fp64 for fp64 x). indices are torch.topk's on the returned probs.
    """
    check_graph_router(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                       score_weight, top_k, activation, query_weight)
    num_experts = expert_features.shape[0]
    compute = compute_dtype(x)
    adj = adjacency.detach().to(compute).contiguous()
    w1 = gcn_weight[0].to(compute)
    token_nodes = act(activation, x.to(compute) @ token_weight.to(compute).t())        # (T, G)
    token_proj = token_nodes @ w1.t()                                                  # (T, G)
    if constant is None:
        expert_nodes = act(activation,
                           expert_features.to(compute) @ expert_weight.to(compute).t())   # (E, G)
        c1 = (adj[:, :num_experts] @ expert_nodes) @ w1.t()                            # (E+1, G)
    else:
        c1 = constant
    if query_weight is None:
        logits, probs = _graph_router_gcn_op(c1.contiguous(), token_proj.contiguous(), adj,
                                             gcn_weight, score_weight, activation)
    else:
        readout = token_readout(x, query_weight)                                       # (T, G)
        logits, probs = _graph_router_gcn_readout_op(c1.contiguous(), token_proj.contiguous(), adj,
                                                     gcn_weight, readout.contiguous(), activation)
    indices, weights = topk_route(probs, top_k)
    return logits, probs, indices, weights
