"""Where the gathered expert mix (no routing plan) beats the plan path: the measurement behind
`gmoe_kernels.small_batch.MAX_TOKENS`.

  python benchmarks/small_batch.py --model smollm2-135m --threads 1 --json benchmarks/results/small-batch-cpu-smollm2-1thread.json
  python benchmarks/small_batch.py --device cuda --backend triton --dtype bf16 --json gpu-small-batch.json

With --model: one greedy decoding step of the real model with GMoE (graph router, E 8, K 2, r 8,
as `run.py --ops decode`) and its KV cache, at batch T = 1 … 32 (T tokens per MLP), with each
path forced in every MLP: in a whole model every layer's weights are cold in the cache, which a
layer timed alone in a loop hides.
Without --model: `functional.expert_mix` alone at SmolLM2-135M's MLP sizes (H 576, F 1536, E 8,
K 2, R 8; `--hidden/--inter/...` to change them) for T = 1 … 256 (the GPU check's measurement).
Either way every path runs interleaved in one run (benchmarks/measure.py: medians; on a CPU the
rounds rotate so that load from other processes lands on all alike), and the fastest path per T
is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import measure, report  # noqa: E402
from gmoe_kernels import functional, small_batch  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODEL_TOKENS = (1, 2, 4, 8, 16, 32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="reference", choices=["reference", "triton"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--inter", type=int, default=1536)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tokens", help=f"token counts (default {','.join(map(str, TOKENS))}; "
                   f"with --model {','.join(map(str, MODEL_TOKENS))})")
    p.add_argument("--model", help="time a decoding step of this packaged model (smollm2-135m) instead of one layer")
    p.add_argument("--prefill", type=int, default=64, help="with --model: prompt tokens in the KV cache")
    p.add_argument("--full", action="store_true", help="more repeats (benchmarks/measure.py FULL settings)")
    p.add_argument("--json", help="write the rows and the machine stamp here")
    return p.parse_args(argv)


def problem(tokens, args, device, dtype, gen):
    H, F, E, K, R = args.hidden, args.inter, args.experts, args.top_k, args.rank

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(tokens, H)
    lora = (rand(E, R, H, scale=H ** -0.5), rand(E, F, R, scale=0.02), rand(E, R, H, scale=H ** -0.5),
            rand(E, F, R, scale=0.02), rand(E, R, F, scale=F ** -0.5))
    probs = torch.softmax(torch.randn(tokens, E, generator=gen), -1).to(device)
    indices, weights = functional.topk_route(probs, K, backend="reference")
    return (x, rand(tokens, F), rand(tokens, F), *lora, indices, weights, 2.0, "silu")


def layer_cases(args, device, dtype, gen):
    """(T, {path: callable}) for `functional.expert_mix` alone."""
    for tokens in _tokens(args, TOKENS):
        inputs = problem(tokens, args, device, dtype, gen)

        def run(path, inputs=inputs):
            with torch.no_grad(), small_batch.forced_path(path):
                return functional.expert_mix(*inputs, backend=args.backend)

        yield tokens, run


def model_cases(args, device, dtype, gen):
    """(T, {path: callable}) for a decoding step of the whole model at batch T."""
    from benchmarks.contenders.decode import DecodeSettings, build_models
    from gmoe.finetune.assets import load_base_model

    base, _ = load_base_model(args.model, dtype=dtype)
    model = build_models(base.to(device), DecodeSettings(), ("gmoe-graph",))["gmoe-graph"]
    model.gmoe_config.backend = args.backend
    for tokens in _tokens(args, MODEL_TOKENS):
        ids = torch.randint(100, 10000, (tokens, args.prefill + 1), generator=gen).to(device)
        with torch.no_grad():
            cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values

        def run(path, ids=ids, cache=cache):
            with torch.no_grad(), small_batch.forced_path(path):
                logits = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
            cache.crop(-1)   # drop the step's token: the next call decodes the same position again
            return (logits,)

        yield tokens, run


def _tokens(args, default):
    return [int(t) for t in args.tokens.split(",")] if args.tokens else list(default)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    threads = measure.setup_threads(device, args.threads)
    stamp = report.machine_stamp(device, dtype, threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    cases = model_cases if args.model else layer_cases
    for tokens, run in cases(args, device, dtype, gen):
        want = run("plan")
        err = {path: max((a.float() - b.float()).abs().max().item() for a, b in zip(run(path), want))
               for path in small_batch.PATHS if path != "plan"}
        timed = measure.time_group({path: (lambda path=path, run=run: run(path)) for path in small_batch.PATHS},
                                   device, measure.FULL if args.full else measure.QUICK)
        row = {"tokens": tokens, **{f"{path}_max_abs_diff": e for path, e in err.items()},
               **{f"{name}_ms": round(ms, 4) for name, (ms, _, _) in timed.items()},
               **{f"{name}_contended": c for name, (_, _, c) in timed.items()}}
        row["fastest"] = min(small_batch.PATHS, key=lambda path: row[f"{path}_ms"])
        rows.append(row)
        print(f"T={tokens:<4} " + "  ".join(f"{path} {row[f'{path}_ms']:8.3f} ms" for path in small_batch.PATHS)
              + f"  fastest: {row['fastest']}  (max |diff| to plan {max(err.values()):.1e})", flush=True)
    print("fastest path by T: " + ", ".join(f"{r['tokens']}: {r['fastest']}" for r in rows))
    if args.json:
        doc = {"machine": stamp, "backend": args.backend, "model": args.model,
               "shape": {k: getattr(args, k) for k in ("hidden", "inter", "experts", "top_k", "rank")},
               "date": time.strftime("%Y-%m-%d"), "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
