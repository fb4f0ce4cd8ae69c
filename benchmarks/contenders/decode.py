"""Inference on a real model (`run.py --ops decode`): prefill throughput and greedy decoding with
the KV cache, for the frozen base model, PEFT LoRA (the same rank on all seven linears), GMoE with
the graph router and GMoE with the linear router (E 8, K 2, r 8, attention LoRAs as PEFT's).

- prefill: one forward of `prefill` tokens (batch 1, `use_cache=True`), tokens/s; every
  contender in each interleaved round (benchmarks/measure.py).
- decode at batch B: `model.generate` (greedy, `new` tokens, KV cache) on B prompts, left-padded;
  a logits processor stamps each step, and decode tok/s = B × (new − 1) / (last − first stamp):
  the steps after the prefill, with generate's own per-step work, as a user sees them. The
  contenders run in rounds, in a rotating order; the median over rounds is reported.
- compiled (`--decode-compile`): greedy decoding at batch 1 with a static KV cache and the step
  under torch.compile (`compiled_rates`), the contenders alike.
- greedy identity: for each GMoE contender, 64 greedy tokens on 8 prompts with its inference
  paths on (router cache, small-batch expert path) and off (no cache, the routing plan).
Each thread count of `threads` is one block of the same run; ratios are taken within a block.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import measure, report
from .common import ATTENTION, MLP

DECODE_IMPLS = ("base", "peft-lora", "gmoe-graph", "gmoe-linear")
# Run only when named (--impls): gmoe-graph with an inference path switched off, on the same
# model object, to show each path's effect in the whole model.
DECODE_EXTRA_IMPLS = ("gmoe-graph-plan", "gmoe-graph-uncached")
PROMPTS = (
    "The quick brown fox jumps over the lazy dog, and then",
    "In a small village at the foot of the mountains there lived an old clockmaker who",
    "Water boils at",
    "The three most important things to remember when learning a new language are",
    "Once upon a time",
    "A recipe for bread needs flour, water, salt and",
    "The history of the printing press begins in the fifteenth century, when a goldsmith named",
    "Photosynthesis is the process by which",
)


@dataclass
class DecodeSettings:
    prefill: int = 512            # tokens of the prefill forward
    batches: tuple = (1, 8)       # decode batch sizes
    new: int = 48                 # new tokens per decode measurement
    rounds: int = 5               # interleaved rounds of every decode measurement
    check_tokens: int = 64        # greedy-identity check: new tokens, on all 8 prompts
    rank: int = 8
    experts: int = 8
    top_k: int = 2
    compiled: bool = False        # also decode with the compiled static-cache step (compiled_rates)


@dataclass
class DecodeResult:
    rows: list = field(default_factory=list)
    checks: dict = field(default_factory=dict)


def build_models(base: nn.Module, settings: DecodeSettings, impls=DECODE_IMPLS, seed: int = 1) -> dict:
    """Each contender on its own deep copy of `base` (eval mode, no gradient anywhere); LoRA B
    factors random (N(0, 0.02)), so no adapter is a no-op."""
    import peft

    from gmoe import GMoEConfig, get_gmoe_model

    base.requires_grad_(False)
    r = settings.rank
    models = {}
    for impl in impls:
        torch.manual_seed(seed)
        if impl == "base":
            model = base
        elif impl == "peft-lora":
            model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=ATTENTION + MLP))
        elif impl in DECODE_EXTRA_IMPLS:
            continue   # wraps gmoe-graph's model, below
        elif impl in ("gmoe-graph", "gmoe-linear"):
            model = get_gmoe_model(copy.deepcopy(base), GMoEConfig(
                num_experts=settings.experts, top_k=settings.top_k, r=r, lora_alpha=2.0 * r,
                target_modules=ATTENTION, router=impl.split("-")[1], backend="reference"))
        else:
            raise ValueError(f"unknown decode contender {impl!r}; known: {DECODE_IMPLS}")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
        models[impl] = model.eval().requires_grad_(False)
    for impl in impls:
        if impl in DECODE_EXTRA_IMPLS:
            graph = models.get("gmoe-graph") or build_models(base, settings, ("gmoe-graph",), seed)["gmoe-graph"]
            models[impl] = PathVariant(graph, path="plan" if impl.endswith("plan") else None,
                                       router_cache=not impl.endswith("uncached"))
    return models


class PathVariant:
    """A GMoE model run with an inference path switched off: `path` forces the expert mix's
    path ("plan": the routing plan at every token count), `router_cache` False recomputes the
    router's token-independent terms every forward."""

    def __init__(self, model, path=None, router_cache=True):
        self.model, self.path, self.router_cache = model, path, router_cache
        self.config = model.config

    def _switched(self):
        from gmoe_kernels import small_batch

        stack = contextlib.ExitStack()
        stack.enter_context(small_batch.forced_path(self.path))
        if not self.router_cache:
            self.model.router_cache = False
            stack.callback(setattr, self.model, "router_cache", True)
        return stack

    def generate(self, *args, **kwargs):
        with self._switched():
            return self.model.generate(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with self._switched():
            return self.model(*args, **kwargs)


def prompt_batch(tokenizer, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch` PROMPTS, tokenized and left-padded: (ids, attention_mask)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(PROMPTS[:batch]), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


class _StepClock:
    """A logits processor that stamps the time of every decoding step (scores unchanged)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def _generate(model, ids, mask, new, clock=None):
    from transformers import LogitsProcessorList

    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, use_cache=True,
                              logits_processor=LogitsProcessorList([clock] if clock else []))


def decode_rates(models: dict, ids, mask, new: int, rounds: int) -> dict:
    """{impl: (median decode tok/s, share of rounds disturbed by other processes)}."""
    for model in models.values():  # warm-up
        _generate(model, ids, mask, 4)

    def rate(name):
        clock = _StepClock()
        _generate(models[name], ids, mask, new, clock)
        return ids.shape[0] * (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0])

    return _interleaved_rates(list(models), rate, rounds)


def _interleaved_rates(names, rate, rounds: int) -> dict:
    """{name: (median of `rate(name)` over `rounds` rounds, share of rounds disturbed by other
    processes)}, every name once per round, in an order rotating from round to round."""
    rates = {n: [] for n in names}
    disturbed = {n: 0 for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            meter = measure.Interference()
            rates[name].append(rate(name))
            disturbed[name] += meter.share() > measure.CONTENDED
    return {n: (statistics.median(rates[n]), disturbed[n] / rounds) for n in names}


def compiled_rates(models: dict, ids, new: int, rounds: int) -> dict:
    """{impl: (median decode tok/s, share of rounds disturbed)} of greedy decoding at batch 1 with
    transformers' static KV cache and the decoding step compiled whole (torch.compile fullgraph,
    inductor): the step of docs/inference.md section 4. Each contender compiles once in a warm-up;
    in each round the cache is reset, the prompt prefilled eagerly and `new` steps timed after
    the first. The contenders' compiled steps are timed alike, so their ratios compare; they do
    not compare with `generate`'s."""
    import inspect

    import transformers

    steps, caches = {}, {}
    for name, model in models.items():
        hf = next(m for m in model.modules() if isinstance(m, transformers.PreTrainedModel))
        key = "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"
        caches[name] = (transformers.StaticCache(config=hf.config, max_cache_len=ids.shape[1] + new + 1), key)

        def step(token, position, model=model, name=name):
            cache, key = caches[name]
            return model(input_ids=token, **{key: cache}, cache_position=position, use_cache=True).logits

        steps[name] = torch.compile(step, fullgraph=True, backend="inductor")

    def decode(name, count):
        cache, key = caches[name]
        cache.reset()
        with torch.no_grad():
            logits = models[name](input_ids=ids, **{key: cache}, cache_position=torch.arange(ids.shape[1]),
                                  use_cache=True).logits
            token, stamps = logits[:, -1:].argmax(-1), []
            for i in range(count):
                token = steps[name](token, torch.tensor([ids.shape[1] + i])).argmax(-1)
                stamps.append(time.perf_counter())
        return stamps

    for name in models:  # warm-up: the compilation
        decode(name, 3)

    def rate(name):
        stamps = decode(name, new)
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    return _interleaved_rates(list(models), rate, rounds)


def prefill_times(models: dict, ids, settings: measure.Settings, device) -> dict:
    """{impl: (median ms, repeats, contended)} of one prefill forward of `ids`."""
    def forward(model):
        def run():
            with torch.no_grad():
                return model(input_ids=ids, use_cache=True).logits
        return run
    return measure.time_group({n: forward(m) for n, m in models.items()}, device, settings)


def greedy_identity(model, ids, mask, new: int) -> dict:
    """Greedy tokens with the inference paths on against off (router cache off, routing plan)."""
    from gmoe_kernels import small_batch

    fast = _generate(model, ids, mask, new)
    model.router_cache = False
    try:
        with small_batch.forced_path("plan"):
            slow = _generate(model, ids, mask, new)
    finally:
        model.router_cache = True
    same = fast[:, ids.shape[1]:] == slow[:, ids.shape[1]:]
    return {"identical": bool(same.all()), "tokens": int(same.numel()), "differing": int((~same).sum()),
            "prompts": int(ids.shape[0]), "new_tokens": new}


def run_block(models: dict, tokenizer, settings: DecodeSettings, threads: int, device, label: str,
              timing: measure.Settings) -> list[dict]:
    """Every measurement of one thread count: rows in run.py's format."""
    torch.set_num_threads(threads)
    shape = f"{label}@{threads}t"
    rows = []
    vocab = tokenizer.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, vocab, (1, settings.prefill), generator=gen).to(device)
    print(f"[decode] {shape}: prefill {settings.prefill} tokens", flush=True)
    for impl, (ms, reps, contended) in prefill_times(models, prefill_ids, timing, device).items():
        rows.append(_row(shape, impl, "prefill", settings.prefill, ms=ms, reps=reps, contended=contended,
                         tokens_per_s=settings.prefill / (ms / 1e3)))
    for batch in settings.batches:
        ids, mask = prompt_batch(tokenizer, batch, device)
        print(f"[decode] {shape}: decode at batch {batch}, {settings.new} new tokens, {settings.rounds} rounds",
              flush=True)
        for impl, (rate, contended) in decode_rates(models, ids, mask, settings.new, settings.rounds).items():
            rows.append(_row(shape, impl, f"decode-b{batch}", batch, tokens_per_s=rate, ms=1e3 * batch / rate,
                             reps=settings.rounds, contended=contended))
    if settings.compiled:
        ids, _ = prompt_batch(tokenizer, 1, device)
        compiled = {n: m for n, m in models.items() if n in DECODE_IMPLS}
        print(f"[decode] {shape}: compiled static-cache decode at batch 1, {settings.new} new tokens", flush=True)
        for impl, (rate, contended) in compiled_rates(compiled, ids, settings.new, settings.rounds).items():
            rows.append(_row(shape, impl, "compiled-b1", 1, tokens_per_s=rate, ms=1e3 / rate,
                             reps=settings.rounds, contended=contended))
    for row in rows:
        busy = f"  ({row['contended']:.0%} disturbed)" if row["contended"] else ""
        print(f"  {row['impl']:<12}{row['mode']:<11}{row['tokens_per_s']:>10.1f} tok/s{busy}", flush=True)
    return rows


def _row(shape, impl, mode, tokens, **values) -> dict:
    note = {"prefill": "tokens/s of one forward (batch 1, KV cache written)",
            "compiled-b1": "decode tok/s, static KV cache, step under torch.compile (inductor), greedy",
            }.get(mode, "decode tok/s after the prefill, generate with KV cache, greedy")
    return {**{k: None for k in report.FIELDS}, "shape": shape, "op": "decode", "impl": impl, "mode": mode,
            "tokens": tokens, "note": note, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}}


# The decoding targets, as tok/s ratios to PEFT LoRA (prefill: time ≤ 1.25× PEFT's).
TARGETS = {("gmoe-graph", "decode-b1"): 0.90, ("gmoe-linear", "decode-b1"): 0.95,
           ("gmoe-graph", "decode-b8"): 0.90, ("gmoe-graph", "prefill"): 1 / 1.25}


def verdict(rows) -> list[str]:
    """One line per target: the measured ratio, and by how much it is missed."""
    out = []
    for row in rows:
        target = TARGETS.get((row["impl"], row["mode"]))
        if row.get("op") != "decode" or target is None or row.get("ratio_peft") is None:
            continue
        speed = 1.0 / row["ratio_peft"]   # ratio_peft is ms over PEFT's ms: its inverse is the tok/s ratio
        state = "met" if speed >= target else f"missed by {100 * (target - speed) / target:.0f} %"
        out.append(f"{row['shape']} {row['mode']}: {row['impl']} at {speed:.2f}x PEFT LoRA's tok/s "
                   f"(target >= {target:.2f}): {state}")
    return out


def plot(rows, path, stamp) -> str:
    """One chart: tok/s of every contender over PEFT LoRA's, per thread count and measurement."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("op") == "decode" and r.get("tokens_per_s")]
    groups = list(dict.fromkeys((r["shape"], r["mode"]) for r in rows))
    impls = [i for i in (*DECODE_IMPLS, *DECODE_EXTRA_IMPLS) if any(r["impl"] == i for r in rows)]
    peft = {(r["shape"], r["mode"]): r["tokens_per_s"] for r in rows if r["impl"] == "peft-lora"}
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(groups)), 3.8))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        values = []
        for g in groups:
            r = next((r for r in rows if (r["shape"], r["mode"]) == g and r["impl"] == impl), None)
            values.append(r["tokens_per_s"] / peft[g] if r and peft.get(g) else 0.0)
        bars = ax.bar([i + (j - (len(impls) - 1) / 2) * width for i in range(len(groups))], values, width,
                      label=impl)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=6)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.90, color="red", lw=0.8, ls="--", label="0.90x target (decode)")
    ax.set_xticks(range(len(groups)), [f"{mode}\n{shape.rpartition('@')[2]}" for shape, mode in groups], fontsize=8)
    ax.set_ylabel("tok/s / PEFT LoRA's")
    ax.set_ylim(0, 1.45)
    ax.legend(fontsize=7, ncol=5, loc="upper center")
    ax.set_title(f"inference, {groups[0][0].rpartition('@')[0] if groups else ''}: throughput over PEFT LoRA "
                 f"(one run; higher is faster)", fontsize=9)
    cores = f"{stamp['cores']} cores · " if stamp.get("cores") else ""
    fig.suptitle(f"{stamp['device_name'].split(' (')[0]} · {cores}{stamp['dtype']} · {stamp['date'][:10]} · "
                 f"threads per block (1t, 2t) · shared machine", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
