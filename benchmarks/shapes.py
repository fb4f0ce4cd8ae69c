"""The registry of named benchmark shapes and the cases each run measures.

A Shape fixes the frozen FFN (H hidden, F intermediate) and the token count T of one layer
call; a Variant fixes the mixture (E experts, K top-k, R LoRA rank). A Case is one of each,
with a routing distribution (ROUTINGS; `make_routing` draws it). Every size carries at least
E8-K2 and E32-K8 (the minimum the benchmarks cover). StepModel describes the small Llama built from a
config for the end-to-end training step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Variant:
    experts: int
    top_k: int
    rank: int

    @property
    def label(self) -> str:
        return f"E{self.experts}-K{self.top_k}-R{self.rank}"


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    tokens: int
    variants: tuple[Variant, ...]
    note: str = ""
    gcn_dim: int = 256      # G: the paper's router width
    gcn_layers: int = 2     # L
    activation: str = "silu"


@dataclass(frozen=True)
class Case:
    shape: Shape
    variant: Variant
    routing: str = "balanced"   # one of ROUTINGS

    @property
    def label(self) -> str:
        tail = "" if self.routing == "balanced" else f"/{self.routing}"
        return f"{self.shape.name}/{self.variant.label}{tail}"


# Expert popularity of a routing. Trained routers are rarely balanced; skewed routings load
# one expert with most pairs and leave others nearly idle, which is where per-expert tiles,
# atomics and load imbalance between programs show.
ROUTINGS = ("balanced", "zipf", "hot")


def expert_popularity(kind: str, num_experts: int) -> torch.Tensor:
    """(E,) float64 sampling weights of the experts, expert 0 the most popular.

    balanced: uniform. zipf: ∝ 1 / (rank + 1)^1.2. hot: expert 0 weighs 9 times all the
    others together, so it is the first draw of ~90% of the tokens.
    """
    if kind == "balanced":
        return torch.ones(num_experts, dtype=torch.float64)
    if kind == "zipf":
        return 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.2
    if kind == "hot":
        pop = torch.ones(num_experts, dtype=torch.float64)
        pop[0] = 9.0 * max(num_experts - 1, 1)
        return pop
    raise ValueError(f"routing {kind!r} is not one of {ROUTINGS}")


def make_routing(num_tokens: int, num_experts: int, top_k: int, kind: str = "balanced", *,
                 empty: int = 0, seed: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A routing drawn from an expert popularity: indices (T, K) int64 and weights (T, K) fp32.

    Each token's K experts are distinct, drawn without replacement with probability ∝
    `expert_popularity(kind)`; the last `empty` experts are never drawn (an empty expert).
    Weights are random, positive, and sum to 1 per token, as renormalised top-K weights do.
    """
    pop = expert_popularity(kind, num_experts)
    if empty:
        pop[num_experts - empty:] = 0.0
    if top_k > int((pop > 0).sum()):
        raise ValueError(f"top_k = {top_k} needs {top_k} experts that can be drawn, "
                         f"got {num_experts} with {empty} empty")
    gen = torch.Generator().manual_seed(seed)
    indices = torch.multinomial(pop.expand(num_tokens, -1), top_k, replacement=False, generator=gen)
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    return indices.to(device), weights.to(device)


@dataclass(frozen=True)
class StepModel:
    """A Llama built from a config (no hub): one training step on batch × seq tokens."""
    name: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    variant: Variant = Variant(8, 2, 8)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def label(self) -> str:
        return f"{self.name}/{self.variant.label}"


V = Variant
E8K2R8, E32K8R8 = V(8, 2, 8), V(32, 8, 8)

SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("tiny", 64, 176, 256, (E8K2R8, E32K8R8, V(16, 4, 2), V(8, 1, 16)),
          note="smoke size (micro-benchmarks, quick GPU)"),
    Shape("cpu-medium", 1024, 2816, 2048, (E8K2R8, E32K8R8, V(16, 4, 16), V(8, 2, 2)),
          note="TinyLlama-1.1B MLP, 2k tokens"),
    Shape("llama3-8b", 4096, 14336, 8192, (V(8, 2, 16), E32K8R8, E8K2R8, V(16, 4, 16)),
          note="Llama-3-8B MLP, 8k tokens"),
    Shape("qwen2-7b", 3584, 18944, 8192, (E8K2R8, E32K8R8, V(8, 2, 2)),
          note="Qwen2-7B MLP, 8k tokens"),
)}

STEP_MODELS: dict[str, StepModel] = {m.name: m for m in (
    StepModel("llama-tiny", hidden=256, inter=704, layers=2, heads=4, kv_heads=2, vocab=4096,
              batch=2, seq=256),
    StepModel("llama-small", hidden=1024, inter=2816, layers=4, heads=16, kv_heads=4, vocab=32000,
              batch=4, seq=1024),
)}


@dataclass(frozen=True)
class RealStepModel:
    """A real pretrained model loaded by `gmoe.finetune.assets.load_base_model(name)` (no hub):
    one training step (forward, LM loss + router loss, backward, AdamW step) on batch × seq tokens."""
    name: str
    batch: int
    seq: int
    variant: Variant = Variant(8, 2, 8)
    rounds: int = 3   # interleaved rounds (a step takes seconds on a CPU)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


# The fine-tuning job's own step on this package's CPU model : SmolLM2-135M-Instruct
# (H 576, F 1536, 30 layers), fp32, batch 4 × 128 tokens.
REAL_STEP_MODELS: dict[str, RealStepModel] = {m.name: m for m in (
    RealStepModel("smollm2-135m", batch=4, seq=128),
)}


def cases(shape_names, all_variants: bool = True, variants: list[str] | None = None) -> list[Case]:
    """Cases for the named shapes: every variant, or only the first (E8-K2-R8), or `variants` labels."""
    out = []
    for name in shape_names:
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
        shape = SHAPES[name]
        chosen = shape.variants if all_variants else shape.variants[:1]
        if variants:
            chosen = [v for v in shape.variants if v.label in variants] or \
                     [parse_variant(label) for label in variants]
        out.extend(Case(shape, v) for v in chosen)
    return out


def parse_variant(label: str) -> Variant:
    """'E8-K2-R8' -> Variant(8, 2, 8)."""
    try:
        e, k, r = (int(part[1:]) for part in label.upper().split("-"))
    except ValueError:
        raise SystemExit(f"variant {label!r} is not of the form E8-K2-R8") from None
    if k > e:
        raise SystemExit(f"variant {label!r}: K must be <= E")
    return Variant(e, k, r)


# What each run measures. Full GPU: every size at its variants; quick CPU: cpu-medium E8-K2-R8.
PLANS = {
    ("cpu", True): dict(ffn=cases(["cpu-medium"], all_variants=False), step=["llama-tiny"]),
    ("cpu", False): dict(ffn=cases(["tiny"]) + cases(["cpu-medium"])[:2], step=["llama-tiny"]),
    ("cuda", True): dict(ffn=cases(["tiny", "cpu-medium"], all_variants=False), step=["llama-tiny"]),
    ("cuda", False): dict(ffn=cases(["cpu-medium", "llama3-8b", "qwen2-7b"]),
                          step=["llama-small"]),
}
