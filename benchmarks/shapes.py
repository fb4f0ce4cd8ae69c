"""The registry of named benchmark shapes and the cases each run measures.

A Shape fixes the frozen FFN (H hidden, F intermediate) and the token count T of one layer
call; a Variant fixes the mixture (E experts, K top-k, R LoRA rank). A Case is one of each.
Every size carries at least E8-K2 and E32-K8 (the issue's minimum). StepModel describes the
small Llama built from a config for the end-to-end training step.
"""
from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def label(self) -> str:
        return f"{self.shape.name}/{self.variant.label}"


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


# The fine-tuning job's own step on this package's CPU model (issue 9): SmolLM2-135M-Instruct
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
