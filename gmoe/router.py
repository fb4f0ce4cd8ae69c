"""Routers: the GMoE graph router and the linear (MixLoRA/Mixtral-style) baseline.

Both return (logits (T,E) fp32, probs (T,E) fp32, indices (T,K) int64, weights (T,K) fp32)
and own the per-layer loss parameters λ (`poisson_rate`) and σ (`normal_std`). They call
gmoe_kernels.functional only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gmoe_kernels import functional
from gmoe_kernels.activations import act, compute_dtype
from gmoe_kernels.backend import resolve_backend

from .router_cache import TermCache
from .topology import build_expert_graph


def _glorot_(tensor: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    return nn.init.xavier_uniform_(tensor, gain=gain)


def _add_loss_parameters(router: nn.Module, num_experts: int, poisson_loss_coef: float,
                         normal_loss_coef: float, freeze: bool = False) -> None:
    """λ (Poisson rate, init 1.5) and σ (Normal std, init E/2), one value each per layer.

    Shape (1,), not 0-dim: FSDP2's fully_shard and DeepSpeed's broadcast refuse 0-dim
    parameters. A loss whose coefficient is 0 leaves its parameter frozen: a trainable
    parameter that never gets a gradient stalls DDP's reducer (or silently skips its all-reduce).
    `freeze` (config `freeze_loss_params`) freezes both, as the published code effectively does
    (there they are plain tensors).
    """
    router.poisson_rate = nn.Parameter(torch.tensor([1.5]), requires_grad=poisson_loss_coef > 0 and not freeze)
    router.normal_std = nn.Parameter(torch.tensor([num_experts / 2.0]),
                                     requires_grad=normal_loss_coef > 0 and not freeze)


def uniform_token_coupling(adjacency_hat: torch.Tensor) -> torch.Tensor:
    """Â with every token–expert edge given one weight, 1/√(d̄·(E+1)), d̄ the mean expert degree.

    Under the GCN normalisation the token reaches expert i with weight 1/√(d_i·(E+1)), so at the
    published gain-100 init, where the token term is ~170x the expert terms on SmolLM2, experts are
    ranked by degree (rank correlation of slots with degree +0.63). With one weight for all experts
    the degrees no longer rank them; the expert–expert part of Â is unchanged. d_i = 1/Â[i, i].
    """
    num_experts = adjacency_hat.shape[0] - 1
    mean_degree = adjacency_hat.diagonal()[:num_experts].reciprocal().mean()
    weight = (mean_degree * (num_experts + 1)).rsqrt()
    coupled = adjacency_hat.clone()
    coupled[:num_experts, num_experts] = weight
    coupled[num_experts, :num_experts] = weight
    return coupled


class GraphRouter(nn.Module):
    """GCN over E expert nodes plus the token node (DESIGN.md, "Graph router").

    Parameters: token_weight (G,H) W_tok, expert_weight (G,H) W_exp, gcn_weight (L,G,G),
    score_weight (G,) w_p (query_weight (G,H) W_q in its place with `token_readout`),
    poisson_rate λ, normal_std σ.
    Buffers (saved with the adapter, never recomputed): expert_features (E,H) X,
    expert_adjacency (E,E) bool.
    """

    def __init__(self, hidden_size, num_experts, top_k, gcn_dim, gcn_layers, edge_density,
                 activation, token_init_gain=100.0, build_graph=True, poisson_loss_coef=1.0,
                 normal_loss_coef=1.0, token_coupling="degree", freeze_loss_params=False,
                 token_readout=False):
        super().__init__()
        self.num_experts, self.top_k, self.activation = num_experts, top_k, activation
        self.token_coupling, self.token_readout = token_coupling, token_readout
        self.token_weight = nn.Parameter(_glorot_(torch.empty(gcn_dim, hidden_size), token_init_gain))
        self.expert_weight = nn.Parameter(_glorot_(torch.empty(gcn_dim, hidden_size)))
        self.gcn_weight = nn.Parameter(torch.stack(
            [_glorot_(torch.empty(gcn_dim, gcn_dim)) for _ in range(gcn_layers)]))
        if token_readout:
            # Each token reads the expert states with its own vector W_q x in place of the shared
            # w_p (docs/routing.md, "A router in which the token decides").
            self.query_weight = nn.Parameter(_glorot_(torch.empty(gcn_dim, hidden_size)))
        else:
            self.score_weight = nn.Parameter(_glorot_(torch.empty(1, gcn_dim)).squeeze(0))
        _add_loss_parameters(self, num_experts, poisson_loss_coef, normal_loss_coef, freeze_loss_params)
        self.register_buffer("expert_features", _glorot_(torch.empty(num_experts, hidden_size)))
        adjacency = torch.zeros(num_experts, num_experts, dtype=torch.bool)
        if build_graph:
            with torch.no_grad():
                nodes = act(activation, self.expert_features @ self.expert_weight.t())
            adjacency = build_expert_graph(nodes, edge_density)
        self.register_buffer("expert_adjacency", adjacency)
        #: Reuse the token-independent terms in eval (`token_independent_terms`); on by default.
        self.cache_terms = True
        self.term_cache = TermCache()

    def train(self, mode: bool = True):
        # Entering or leaving training drops the eval cache as well: this also covers training
        # steps compiled by torch.compile, whose forwards do not run the clear above.
        self.term_cache.clear()
        return super().train(mode)

    def normalized_adjacency(self) -> torch.Tensor:
        """Â (E+1, E+1) fp32 of the current `expert_adjacency`, computed once and cached
        (with `uniform_token_coupling` applied when token_coupling is "uniform").

        The adjacency is fixed, so the ~10 small ops building Â need not run every step. The
        cache is a plain attribute (not a buffer: it stays out of the adapter and of dtype casts)
        keyed on the adjacency tensor's identity and version counter, so any change to the
        buffer recomputes it: load_state_dict / load_adapter_state_dict (in-place copies bump
        the version), `.to()` and other casts (a new tensor), or assigning a new buffer.
        """
        adjacency = self.expert_adjacency

        def build():
            a_hat = functional.normalized_adjacency(adjacency)
            return uniform_token_coupling(a_hat) if self.token_coupling == "uniform" else a_hat

        # Traced into the graph under torch.compile. Not cached in inference mode: an inference
        # tensor cannot be saved for a later training backward (and has no version counter).
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or adjacency.is_inference():
            return build()
        cached = self.__dict__.get("_normalized_adjacency")
        if cached is None or cached[0] is not adjacency or cached[1] != adjacency._version:
            cached = (adjacency, adjacency._version, build())
            self.__dict__["_normalized_adjacency"] = cached
        return cached[2]

    def token_independent_terms(self, x: torch.Tensor, backend: str | None = None):
        """(Â, C1): the normalised adjacency and layer 1's constant (`graph_router_constant`)
        for inputs like `x`, or (Â, None) where the router op must compute C1 itself.

        Training mode, or autograd recording with a source requiring grad: (Â, None), the
        training path, unchanged. Otherwise (eval, inference): C1 from the eval cache
        (`gmoe.router_cache`), rebuilt whenever a source tensor, the backend or the dtype
        changed; with `cache_terms` False, or while torch.compile traces, computed afresh by
        the same ops (so cached and uncached routing are the same bits).
        """
        sources = (self.expert_features, self.expert_weight, self.gcn_weight, self.expert_adjacency)
        if self.training or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            # An optimizer step may follow, and fused optimizers (AdamW(fused=True), Trainer's
            # default adamw_torch_fused) write parameters without bumping their version counters:
            # the cache's key would not see the step, so a forward that can lead to one drops it.
            self.term_cache.clear()
            return self.normalized_adjacency(), None
        compute = compute_dtype(x)

        def build():
            a_hat = self.normalized_adjacency()
            return a_hat, functional.graph_router_constant(
                self.expert_features, self.expert_weight, a_hat, self.gcn_weight, self.activation, compute)

        if not self.cache_terms or not self.term_cache.usable(self, sources):
            return build()
        settings = (resolve_backend(backend, x.device), compute, self.activation, self.token_coupling)
        return self.term_cache.get(sources, settings, build)

    def forward(self, x: torch.Tensor, backend: str | None = None):
        dtype = x.dtype  # fp32 from GMoEMLP for half-precision models; fp64 in gradchecks
        adjacency, constant = self.token_independent_terms(x, backend)
        readout = (dict(query_weight=self.query_weight.to(dtype)) if self.token_readout else {})
        return functional.graph_router(
            x, self.token_weight.to(dtype), self.expert_weight.to(dtype),
            self.expert_features.to(dtype), adjacency, self.gcn_weight.to(dtype),
            None if self.token_readout else self.score_weight.to(dtype), self.top_k, self.activation,
            backend=backend, layer1_constant=constant, **readout)


class LinearRouter(nn.Module):
    """softmax(W x) over experts, top-K, renormalised: the MixLoRA/Mixtral gate.

    With a GMoE loss switched on (the paper's "no graph" ablation) it owns λ and σ as the
    graph router does; as the plain MixLoRA baseline (both coefficients 0) it has neither,
    so its adapter holds `router.weight` only.
    """

    def __init__(self, hidden_size, num_experts, top_k, init_std=0.02, poisson_loss_coef=0.0,
                 normal_loss_coef=0.0, freeze_loss_params=False):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size) * init_std)
        if poisson_loss_coef > 0 or normal_loss_coef > 0:
            _add_loss_parameters(self, num_experts, poisson_loss_coef, normal_loss_coef, freeze_loss_params)

    def forward(self, x: torch.Tensor, backend: str | None = None):
        logits = (x @ self.weight.to(x.dtype).t()).to(compute_dtype(x))
        probs = torch.softmax(logits, dim=-1)
        indices, weights = functional.topk_route(probs, self.top_k, backend=backend)
        return logits, probs, indices, weights
