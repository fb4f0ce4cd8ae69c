"""Routing telemetry: how each GMoE layer spreads its tokens over the experts.

Counted on the device in every training forward (and in eval forwards inside
`GMoEModel.measuring_routing()`), with no host synchronisation, into non-persistent buffers of
each GMoE layer; read, and reset, at logging time by `GMoEModel.routing_stats()`. Per layer and window:
- `slot_share` (E,): each expert's share of the top-K slots of the non-padding tokens;
- `mass_share` (E,): each expert's share of the routed probability mass (the top-K
  probabilities, the quantity the Normal balance loss counts as load);
- `busiest_share`: the largest slot share (balanced: 1/E);
- `load_entropy`: the entropy of `slot_share` divided by log E (1 balanced, 0 all on one expert);
- `top_set_fraction`: the fraction of tokens routed to the layer's most common set of K experts,
  a measure of token-independence (1: every token takes the same experts);
- `idle_experts`: experts with under 1/(4E) of the slots;
- `effective_experts`: the mean over tokens of 1/Σ_k w_k², w the renormalised top-K mixing weights
  (K when a token's K weights are equal, 1 when one weight takes it all: ReMix's effective support size);
- `poisson_rate` λ and `normal_std` σ (None where the router has none);
- `degree_correlation`: for the graph router, the rank correlation of the slots with each
  expert's degree in the expert graph.

In training the counts join the all-reduce the router losses already make, so under data
parallelism every rank holds the global counts; eval-mode counts are per process.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

#: Most top-K sets counted exactly; with more possible sets (C(E, K) > this), a set is counted in the
#: bucket of its rank modulo this, and `top_set_fraction` is an upper bound (`exact_sets` False).
MAX_SETS = 1024
COUNT_NAMES = ("routing_slots", "routing_mass", "routing_sets", "routing_effective")


def set_buckets(num_experts: int, top_k: int) -> int:
    return min(math.comb(num_experts, top_k), MAX_SETS)


def set_digits(num_experts: int, top_k: int) -> torch.Tensor:
    """(E, K) int64: digits[c, k] = C(c, k + 1). For a sorted set c_0 < … < c_{K-1}, the sum of
    digits[c_k, k] is the set's rank in [0, C(E, K)) (the combinatorial number system)."""
    return torch.tensor([[math.comb(c, k + 1) for k in range(top_k)] for c in range(num_experts)], dtype=torch.int64)


def register_window(layer: torch.nn.Module, num_experts: int, top_k: int, device) -> None:
    """The per-layer window counts, as non-persistent fp32 buffers (not in the adapter; moved,
    traced and faked with the module): slots (E,), routed mass (E,), top-K sets (buckets,), the sum of
    the tokens' effective numbers of experts (1,), tokens (1,)."""
    layer.register_buffer("routing_slots", torch.zeros(num_experts, device=device), persistent=False)
    layer.register_buffer("routing_mass", torch.zeros(num_experts, device=device), persistent=False)
    layer.register_buffer("routing_sets", torch.zeros(set_buckets(num_experts, top_k), device=device),
                          persistent=False)
    layer.register_buffer("routing_effective", torch.zeros(1, device=device), persistent=False)
    layer.register_buffer("routing_tokens", torch.zeros(1, device=device), persistent=False)
    layer.register_buffer("routing_set_digits", set_digits(num_experts, top_k).to(device), persistent=False)


def batch_counts(indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None,
                 digits: torch.Tensor, num_buckets: int) -> dict[str, torch.Tensor]:
    """One forward's slot, set and effective-expert counts for all L layers at once, on the device,
    without gradient.

    indices (L, T, K) int64, weights (L, T, K) the renormalised top-K mixing weights, mask (T,) bool
    or None, digits (E, K) from `set_digits`. Returns {"routing_slots": (L, E), "routing_sets":
    (L, buckets), "routing_effective": (L, 1) the sum over non-padding tokens of 1/Σ_k w_k²}. The
    routed mass is the batch load the losses already compute (`gmoe.losses.batch_load`).
    """
    num_layers, num_tokens, top_k = indices.shape
    num_experts = digits.shape[0]
    with torch.no_grad():
        keep = torch.ones(num_tokens, device=indices.device) if mask is None else mask.float()
        flat = indices.reshape(num_layers, -1)
        zeros = torch.zeros(num_layers, num_experts, device=indices.device)
        slots = zeros.scatter_add(1, flat, keep[None, :, None].expand(num_layers, num_tokens, top_k).reshape(num_layers, -1))
        ordered = indices.sort(dim=-1).values
        rank = digits[ordered, torch.arange(top_k, device=indices.device)].sum(-1)  # (L, T)
        sets = torch.zeros(num_layers, num_buckets, device=indices.device).scatter_add(
            1, rank % num_buckets, keep.expand(num_layers, num_tokens).contiguous())
        # (Σ_k w_k = 1, so Σ_k w_k² ≥ 1/K > 0: the reciprocal is finite for finite weights.)
        effective = (weights.detach().float().square().sum(-1).reciprocal() * keep).sum(-1, keepdim=True)
    return {"routing_slots": slots, "routing_sets": sets, "routing_effective": effective}


def accumulate(layers, counts: dict[str, torch.Tensor], tokens: torch.Tensor) -> None:
    """Add {"routing_slots", "routing_mass", "routing_sets"} (L rows each) and the token count to the
    layers' window buffers."""
    with torch.no_grad():
        for name in COUNT_NAMES:
            torch._foreach_add_([getattr(layer, name) for layer in layers], list(counts[name].detach().unbind(0)))
        total = tokens.detach().float().reshape(1)
        torch._foreach_add_([layer.routing_tokens for layer in layers], [total] * len(layers))


def reset(layers) -> None:
    with torch.no_grad():
        torch._foreach_zero_([getattr(layer, name) for layer in layers for name in (*COUNT_NAMES, "routing_tokens")])


@dataclass
class LayerRouting:
    """One layer's routing over one window (see the module docstring for each field)."""

    name: str
    tokens: int
    slot_share: list[float]
    mass_share: list[float]
    busiest_share: float
    load_entropy: float
    top_set_fraction: float
    idle_experts: int
    poisson_rate: float | None
    normal_std: float | None
    degree_correlation: float | None
    #: Last, with a default: records written before it was counted still load.
    effective_experts: float | None = None


SUMMARY_FIELDS = ("busiest_share", "load_entropy", "top_set_fraction", "idle_experts", "effective_experts",
                  "poisson_rate", "normal_std", "degree_correlation")


@dataclass
class RoutingStats:
    """Every layer's routing over one window, with the means over layers in `summary()`."""

    num_experts: int
    top_k: int
    tokens: int
    exact_sets: bool
    layers: list[LayerRouting]

    def summary(self) -> dict:
        """The mean over layers of each `SUMMARY_FIELDS` field (None where no layer has it)."""
        out = {"tokens": self.tokens}
        for name in SUMMARY_FIELDS:
            values = [getattr(layer, name) for layer in self.layers if getattr(layer, name) is not None]
            out[name] = sum(values) / len(values) if values else None
        return out

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "tokens": self.tokens,
                "exact_sets": self.exact_sets, "summary": self.summary(),
                "layers": [asdict(layer) for layer in self.layers]}

    def format(self) -> str:
        """A per-layer text table and the means, for a terminal."""
        head = (f"{'layer':>5} {'busiest':>8} {'entropy':>8} {'top set':>8} {'idle':>5} {'eff.':>5} {'λ':>6} {'σ':>6}  "
                f"slot share per expert (balanced {1 / self.num_experts:.3f})")
        rows = [head]
        for i, layer in enumerate(self.layers):
            rows.append(f"{i:>5} {layer.busiest_share:>8.3f} {layer.load_entropy:>8.3f} "
                        f"{layer.top_set_fraction:>8.3f} {layer.idle_experts:>5d} {_num(layer.effective_experts):>5} "
                        f"{_num(layer.poisson_rate):>6} "
                        f"{_num(layer.normal_std):>6}  " + " ".join(f"{v:.2f}" for v in layer.slot_share))
        s = self.summary()
        rows.append(f"{'mean':>5} {s['busiest_share']:>8.3f} {s['load_entropy']:>8.3f} "
                    f"{s['top_set_fraction']:>8.3f} {s['idle_experts']:>5.1f} {_num(s['effective_experts']):>5} "
                    f"{_num(s['poisson_rate']):>6} "
                    f"{_num(s['normal_std']):>6}  over {self.tokens} tokens"
                    + ("" if self.exact_sets else "; top set: bucketed, an upper bound"))
        return "\n".join(rows)


def _num(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _share(counts: list[float]) -> list[float]:
    total = sum(counts)
    return [c / total if total > 0 else 0.0 for c in counts]


def _ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2
        i = j + 1
    return ranks


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (None when either side is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else None


def layer_routing(name: str, slots: list[float], mass: list[float], sets: list[float], tokens: int,
                  router, effective: float = 0.0) -> LayerRouting:
    """The summary of one layer's window counts (host lists; `effective` the sum over tokens of
    1/Σ_k w_k²) and its router's λ, σ and graph."""
    num_experts = len(slots)
    slot_share, mass_share = _share(slots), _share(mass)
    entropy = -sum(p * math.log(p) for p in slot_share if p > 0)
    degree = None
    adjacency = getattr(router, "expert_adjacency", None)
    if adjacency is not None and tokens:
        degree = rank_correlation(slots, adjacency.sum(1).float().tolist())
    rate, std = getattr(router, "poisson_rate", None), getattr(router, "normal_std", None)
    return LayerRouting(
        name=name, tokens=tokens, slot_share=slot_share, mass_share=mass_share,
        busiest_share=max(slot_share), load_entropy=entropy / math.log(num_experts) if num_experts > 1 else 1.0,
        top_set_fraction=max(sets) / tokens if tokens else 0.0,
        idle_experts=sum(s < 1 / (4 * num_experts) for s in slot_share) if tokens else 0,
        effective_experts=effective / tokens if tokens else 0.0,
        poisson_rate=None if rate is None else float(rate.detach().reshape(-1)[0]),
        normal_std=None if std is None else float(std.detach().reshape(-1)[0]),
        degree_correlation=degree)


def read_window(layers, top_k: int) -> RoutingStats:
    """RoutingStats from the layers' window buffers and their routers (host reads: call it where the
    host waits anyway, as at logging time)."""
    slots = torch.stack([layer.routing_slots for layer in layers]).tolist()
    mass = torch.stack([layer.routing_mass for layer in layers]).tolist()
    sets = torch.stack([layer.routing_sets for layer in layers]).tolist()
    effective = torch.cat([layer.routing_effective for layer in layers]).tolist() if layers else []
    tokens = int(round(layers[0].routing_tokens.item())) if layers else 0
    rows = [layer_routing(getattr(layer, "layer_name", str(i)), slots[i], mass[i], sets[i], tokens, layer.router,
                          effective[i])
            for i, layer in enumerate(layers)]
    num_experts = len(slots[0]) if slots else 0
    return RoutingStats(num_experts=num_experts, top_k=top_k, tokens=tokens,
                        exact_sets=math.comb(num_experts, top_k) <= MAX_SETS, layers=rows)
