"""Where the gathered expert mix (no routing plan) beats the plan path: the measurement behind
`gmoe_kernels.small_batch`'s thresholds.

  python benchmarks/small_batch.py --threads 1 --json benchmarks/results/small-batch-cpu-1thread.json
  python benchmarks/small_batch.py --device cuda --backend triton --json gpu-small-batch.json

Times `functional.expert_mix` without autograd (decoding) at SmolLM2-135M's MLP sizes (H 576,
F 1536, E 8, K 2, R 8; `--hidden/--inter/...` to change them) for T = 1 … 256 tokens, both
paths interleaved in one run (benchmarks/measure.py: medians; on a CPU the rounds rotate so
that load from other processes lands on both alike), and prints the largest T up to which the
gathered path is at least as fast at every T.
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
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
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


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    threads = measure.setup_threads(device, args.threads)
    stamp = report.machine_stamp(device, dtype, threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        inputs = problem(tokens, args, device, dtype, gen)

        def run(path, inputs=inputs):
            with torch.no_grad(), small_batch.forced_path(path):
                return functional.expert_mix(*inputs, backend=args.backend)

        got, want = run("gathered"), run("plan")
        err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
        timed = measure.time_group({"plan": lambda: run("plan"), "gathered": lambda: run("gathered")},
                                   device, measure.QUICK)
        row = {"tokens": tokens, "max_abs_diff": err,
               **{f"{name}_ms": round(ms, 4) for name, (ms, _, _) in timed.items()},
               **{f"{name}_contended": c for name, (_, _, c) in timed.items()}}
        row["speedup"] = round(row["plan_ms"] / row["gathered_ms"], 3)
        rows.append(row)
        print(f"T={tokens:<4} plan {row['plan_ms']:8.3f} ms  gathered {row['gathered_ms']:8.3f} ms  "
              f"x{row['speedup']:.2f}  (max |diff| {err:.1e})", flush=True)
    faster = [r["tokens"] for r in rows if r["speedup"] >= 1.0]
    threshold = 0
    for r in rows:
        if r["speedup"] < 1.0:
            break
        threshold = r["tokens"]
    print(f"gathered at least as fast up to T = {threshold} (faster at T in {faster})")
    if args.json:
        doc = {"machine": stamp, "backend": args.backend, "threshold": threshold,
               "shape": {k: getattr(args, k) for k in ("hidden", "inter", "experts", "top_k", "rank")},
               "date": time.strftime("%Y-%m-%d"), "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
