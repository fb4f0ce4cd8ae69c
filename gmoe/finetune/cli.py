"""`gmoe-finetune` / `python -m gmoe.finetune`.

    gmoe-finetune --task arc-c --method gmoe [--seeds 3] [--quick | --preset table] ...
    gmoe-finetune compare --task obqa --methods lora,mixlora,gmoe --seeds 3 --preset table
    gmoe-finetune --task arc-c --eval-only [--adapter RUN_DIR/adapter]
    gmoe-finetune routing --task arc-c [--adapter RUN_DIR/adapter | --method gmoe-uniform]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .job import Job, JobConfig
from .methods import METHODS
from .tasks import TASKS

#: Fixed training budgets. "table" is the README comparison's budget: set before any result was
#: seen and identical for every method. "quick" is `make demo`'s.
PRESETS = {
    "quick": {"task": "obqa", "epochs": 1.0, "max_train_examples": 200, "max_eval_examples": 100,
              "batch_size": 8, "lr": 5e-4, "warmup_ratio": 0.1, "max_length": 256, "log_steps": 2},
    "table": {"epochs": 2.0, "batch_size": 8, "grad_accum": 1, "lr": 5e-4, "warmup_ratio": 0.1, "max_length": 256,
              "r": 8, "alpha": 16.0, "dropout": 0.05, "experts": 8, "top_k": 2, "eval_fraction": 0.5,
              "split_seed": 1234, "seeds": 3},
    # The routing study's budget, fixed before any of its results: 500 training examples, one epoch,
    # so 4 methods x 3 seeds on SIQA and PIQA fit in about 6 hours of a 2-core CPU.
    "study": {"epochs": 1.0, "max_train_examples": 500, "batch_size": 8, "grad_accum": 1, "lr": 5e-4,
              "warmup_ratio": 0.1, "max_length": 256, "r": 8, "alpha": 16.0, "dropout": 0.05, "experts": 8,
              "top_k": 2, "eval_fraction": 0.5, "split_seed": 1234, "seeds": 3, "log_steps": 5},
}


def _fail(message: str):
    print(f"gmoe-finetune: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser(compare: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gmoe-finetune" + (" compare" if compare else ""),
        description=("Compare several methods on one task (mean ± std over seeds)" if compare else
                     "Fine-tune a causal LM with GMoE or a baseline on a multiple-choice task and score it "
                     "as lm-evaluation-harness does"))
    # Defaults are None here: a preset fills what the command line leaves unset, then JobConfig's defaults.
    a = p.add_argument
    a("--model", help="local Hugging Face folder, a .gguf file, or the alias smollm2-135m (default)")
    a("--task", choices=list(TASKS), help="task (default arc-c; obqa under --quick)")
    if compare:
        a("--methods", type=_csv, help=f"comma-separated methods (default: all of {','.join(METHODS)})")
    else:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--method", choices=METHODS, help="adapter method (default gmoe)")
        g.add_argument("--methods", type=_csv, help="comma-separated methods: same as the compare subcommand")
    a("--seeds", type=int, help="number of seeds, run as 0..N-1 (default 1; 3 under --preset table)")
    a("--seed", type=int, help="first seed (default 0)")
    a("--epochs", type=float)
    a("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    a("--lr", type=float)
    a("--batch-size", type=int)
    a("--eval-batch-size", type=int, help="requests per scoring forward, at most (default 64)")
    a("--eval-batch-tokens", type=int, help="padded tokens per scoring forward, at most (default 2048)")
    a("--grad-accum", type=int)
    a("--max-length", type=int, help="tokens per sequence; longer prompts lose tokens from the left")
    a("--warmup-ratio", type=float)
    a("--r", type=int, help="LoRA rank (of every expert and of the plain LoRAs)")
    a("--alpha", type=float, help="LoRA alpha (scaling alpha / r)")
    a("--dropout", type=float, help="LoRA dropout")
    a("--experts", type=int, help="E, experts per MLP (MoE methods)")
    a("--top-k", type=int, help="K, experts per token (MoE methods)")
    a("--train-file", help="JSONL in the dataset's own fields (alone: split like the built-in data)")
    a("--eval-file", help="JSONL held-out examples (with --train-file: no split is made)")
    a("--split-seed", type=int, help="seed of the train / held-out split (default 1234), not a training seed")
    a("--eval-fraction", type=float, help="held-out fraction of the validation set (default 0.5)")
    a("--eval-size", type=int, help="held-out size instead of --eval-fraction")
    a("--max-train-examples", type=int)
    a("--max-eval-examples", type=int)
    a("--output-dir", help="where runs, tables and plots go (default outputs/finetune)")
    a("--preset", choices=list(PRESETS), help="a fixed budget: quick (the demo), table (the ARC-C/OBQA table) or study (the routing study)")
    a("--quick", action="store_true", help="same as --preset quick")
    a("--log-steps", type=int)
    a("--force", action="store_true",
      help="rerun a (method, seed) even if it is done; a run another live process holds is still skipped "
           "(exit status 3)")
    if not compare:
        a("--eval-only", action="store_true", help="score only: the zero-shot base model, or --adapter")
        a("--adapter", help="with --eval-only: a saved adapter folder (GMoE or PEFT)")
    return p


def config_from_args(args: argparse.Namespace, compare: bool) -> JobConfig:
    preset_name = "quick" if args.quick else args.preset
    if args.quick and args.preset and args.preset != "quick":
        _fail("--quick and --preset table exclude each other")
    values = dict(PRESETS.get(preset_name, {}))
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    values.update(given)
    n_seeds = values.pop("seeds", 1)
    first = values.pop("seed", 0)
    if n_seeds < 1:
        _fail(f"--seeds {n_seeds} must be at least 1")
    method = values.pop("method", None)
    methods = values.pop("methods", None) or ([method] if method else (list(METHODS) if compare else ["gmoe"]))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        _fail(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}")
    for k in ("quick", "preset"):
        values.pop(k, None)
    if values.get("adapter") and not values.get("eval_only"):
        _fail("--adapter is for --eval-only runs")
    known = {f.name for f in dataclasses.fields(JobConfig)}
    cfg = JobConfig(**{k: v for k, v in values.items() if k in known},
                    methods=methods, seeds=list(range(first, first + n_seeds)), preset=preset_name)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "routing":
        from .routing import main as routing_main

        return routing_main(argv[1:])
    compare = bool(argv) and argv[0] == "compare"
    if compare:
        argv = argv[1:]
    args = build_parser(compare).parse_args(argv)
    cfg = config_from_args(args, compare)
    try:
        job = Job(cfg)
        if cfg.eval_only:
            res = job.eval_only()
            z = res["zero_shot"]
            print(f"zero-shot {cfg.task}: acc {z['acc']:.4f}  acc_norm {z['acc_norm']:.4f}  (n {z['n']})")
            if "finetuned" in res:
                f = res["finetuned"]
                print(f"adapter {cfg.adapter}: acc {f['acc']:.4f}  acc_norm {f['acc_norm']:.4f}")
            print(f"results: {res['path']}")
            return 0
        summary = job.compare()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        from .assets import MissingAssetError

        if isinstance(err, RuntimeError) and not isinstance(err, MissingAssetError):
            raise
        print(f"gmoe-finetune: error: {err}", file=sys.stderr)
        return 2
    print()
    print(summary["markdown"])
    _print_outputs(summary)
    if summary["busy"]:
        for b in summary["busy"]:
            print(f"gmoe-finetune: error: {b['method']} seed {b['seed']} not run here: {b['reason']}; "
                  "rerun this command once that process has finished", file=sys.stderr)
        return BUSY
    return 0


#: Exit status when an asked (method, seed) was skipped because another live process runs it.
BUSY = 3


def _print_outputs(summary: dict) -> None:
    """The files written, only those that exist (a skipped run has none)."""
    paths = summary["paths"]
    print("  ".join(f"{kind}: {paths[key]}" for kind, key in (("table", "markdown"), ("json", "json"),
                                                           ("plot", "plot")) if paths.get(key)))
    for run in summary["runs"]:
        files = [p for p in run["files"] if p and os.path.exists(p)]
        print(f"{run['method']} seed {run['seed']}: " + ", ".join(files))


if __name__ == "__main__":
    sys.exit(main())
