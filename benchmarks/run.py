"""Throughput and memory of GMoE side by side with the published loop, PEFT LoRA and MixLoRA.

  python benchmarks/run.py --device cpu --quick --json out.json     # < 2 min on 2 CPU cores
  python benchmarks/run.py --device cuda --json gpu.json --plot out/gpu   # full GPU run

Ops: `ffn` (one GMoE FFN layer on given routing), `router` (routing T tokens), `step` (one
training step, forward+loss+backward, of a small Llama built from a config; of a local model
with --model; the whole step with AdamW of a real pretrained model with
--step-models smollm2-135m, rows of mode `train`), `decode` (inference on a real model: prefill
tokens/s and greedy decode tok/s with the KV cache, per --decode-threads; asked for by name:
  python benchmarks/run.py --device cpu --ops decode --no-check --json out.json --plot out/cpu). Every contender of a case runs on the same weights and inputs (benchmarks/contenders/),
timed the same way (measure.py). See benchmarks/README.md for every column.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from pathlib import Path

_T0 = time.perf_counter()  # elapsed time is reported from here: imports and calibration included

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import contenders, measure, report  # noqa: E402
from benchmarks.shapes import (PLANS, REAL_STEP_MODELS, ROUTINGS, SHAPES, STEP_MODELS, Case,  # noqa: E402
                               cases)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: fp32 on CPU, bf16 on GPU")
    p.add_argument("--quick", action="store_true", help="fewer cases and repeats (CPU: cpu-medium E8-K2-R8)")
    p.add_argument("--shapes", help=f"comma-separated shape names ({', '.join(SHAPES)}); default: the plan")
    p.add_argument("--variants", help="comma-separated E-K-R labels, e.g. E8-K2-R8,E32-K8-R8 (default: each shape's)")
    p.add_argument("--ops", default="ffn,router,step",
                   help="subset of ffn,router,step,decode (decode: inference on --decode-model, not by default)")
    p.add_argument("--routings", default="balanced",
                   help=f"comma-separated expert popularities of the ffn cases ({', '.join(ROUTINGS)})")
    p.add_argument("--impls", help="comma-separated contenders to run (default: all)")
    p.add_argument("--step-models", help=f"comma-separated ({', '.join([*STEP_MODELS, *REAL_STEP_MODELS])}); "
                   "default: the plan. Real models (loaded from their package, seconds per step) time the "
                   "whole training step with AdamW ('train' rows)")
    p.add_argument("--step-rounds", type=int, default=None,
                   help="interleaved rounds of a real-model step (default: the model's, 3)")
    p.add_argument("--model", default=os.environ.get("GMOE_BENCH_MODEL"),
                   help="a local Hugging Face causal-LM folder to time one step of (env GMOE_BENCH_MODEL)")
    p.add_argument("--model-batch", type=int, default=1)
    p.add_argument("--model-seq", type=int, default=512)
    p.add_argument("--decode-model", default="smollm2-135m", help="the real model of --ops decode")
    p.add_argument("--decode-threads", default="1,2", help="CPU thread counts of --ops decode, one block each")
    p.add_argument("--decode-new", type=int, default=None, help="new tokens per decode measurement (default 48)")
    p.add_argument("--decode-rounds", type=int, default=None, help="interleaved decode rounds (default 5; --quick 3)")
    p.add_argument("--decode-compile", action="store_true",
                   help="--ops decode also times the compiled static-cache decoding step (inductor; minutes to compile)")
    p.add_argument("--json", help="write rows + machine stamp here")
    p.add_argument("--csv", help="write stamped CSV rows here")
    p.add_argument("--plot", metavar="PREFIX", help="write PNG charts PREFIX-<op>-<shape>.png")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cases after this many seconds (rows so far are kept)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the machine's cores)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the tiny-shape agreement check (and --ops decode's greedy-identity check)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def known_impls() -> set[str]:
    names = {*contenders.FFN_IMPLS, *contenders.ROUTER_IMPLS, *contenders.STEP_IMPLS, *contenders.REAL_STEP_IMPLS,
             *contenders.DECODE_IMPLS, *contenders.decode.DECODE_EXTRA_IMPLS}
    return names.union(*contenders.EXTRA_IMPLS.values())


def _writable_file(flag: str, path: str) -> None:
    """`path` can be written later: not a folder, in an existing writable folder (checked before a
    run of minutes to hours, whose rows would otherwise be lost at the end)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"{flag} {path}: is a folder; pass a file name")
    if not os.path.isdir(folder):
        raise SystemExit(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"{flag} {path}: the folder {folder} is not writable")


def check_args(args) -> None:
    """Every argument checked before any timing starts."""
    if args.impls is not None:
        wanted = [n for n in args.impls.split(",") if n]
        unknown = sorted(set(wanted) - known_impls())
        if not wanted or unknown:
            raise SystemExit(f"--impls: unknown {unknown or args.impls!r}; choose from {', '.join(sorted(known_impls()))}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: must be at least 1")
    for flag, path in (("--json", args.json), ("--csv", args.csv)):
        if path:
            _writable_file(flag, path)
    if args.plot:
        _writable_file("--plot", args.plot + "-x.png")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


class Runner:
    def __init__(self, args, device, dtype, settings, roof, stamp):
        self.args, self.device, self.dtype, self.settings = args, device, dtype, settings
        self.roof, self.stamp = roof, stamp
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.checks: dict = {}
        self.start = _T0
        self.impls = set(args.impls.split(",")) if args.impls else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, what: str) -> bool:
        if self.args.budget_s is not None and self.elapsed() > self.args.budget_s:
            self.skipped.append(what)
            print(f"  budget of {self.args.budget_s:.0f}s spent: skipping {what}", flush=True)
            return True
        return False

    def wanted(self, names, op):
        if self.impls is None:
            return list(names)
        return [n for n in (*names, *contenders.EXTRA_IMPLS[op]) if n in self.impls]

    # ----- the contenders of one case, both modes, timed together
    def measure(self, cs: list, base_row: dict, floor=None, modes=("fwd", "fwd_bwd"), settings=None) -> None:
        live, rows = [], {}
        for c in cs:
            if c.error:
                rows[c.impl] = [{**base_row, "impl": c.impl, "mode": None, "ms": None, "error": c.error,
                                 "note": c.note or None}]
                print(f"  {c.impl:<16} n/a: {c.error}", flush=True)
                continue
            saved = None
            try:
                if not c.inference_only:
                    saved = measure.saved_bytes(c.forward, c.persistent)
            except Exception as err:  # noqa: BLE001
                c.note = (c.note + f"; saved bytes failed: {err}").strip("; ")
            rows[c.impl] = []
            for mode in ([m for m in modes if m == "fwd"] if c.inference_only else modes):
                fn = {"fwd": c.fwd, "fwd_bwd": c.fwd_bwd, "train": c.train}[mode]
                row = {**base_row, "impl": c.impl, "mode": mode, "saved_bytes": saved, "note": c.note or None,
                       "error": None, "ms": None}
                try:  # one call on its own first, so a failing contender cannot sink the others
                    fn()
                    row["peak_bytes"] = measure.peak_bytes(fn, self.device)
                    live.append((c.impl, mode, fn))
                except Exception as err:  # noqa: BLE001 - one failing contender must not stop the run
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                    print(f"  {c.impl:<16}{mode:<8} failed: {row['error']}", flush=True)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                rows[c.impl].append(row)
        settings = settings or self.settings
        for mode in modes:
            group = {impl: fn for impl, m, fn in live if m == mode}
            if not group:
                continue
            try:
                timed = measure.time_group(group, self.device, settings)
            except Exception:  # noqa: BLE001 - time them one by one, so only the culprit is lost
                timed = {}
                for impl, fn in group.items():
                    try:
                        timed.update(measure.time_group({impl: fn}, self.device, settings))
                    except Exception as err:  # noqa: BLE001
                        row = next(r for r in rows[impl] if r["mode"] == mode)
                        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                        print(f"  {impl:<16}{mode:<8} failed: {row['error']}", flush=True)
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()
            for impl, (ms, reps, contended) in timed.items():
                row = next(r for r in rows[impl] if r["mode"] == mode)
                row.update(ms=round(ms, 4), reps=reps, tokens_per_s=round(base_row["tokens"] / (ms / 1e3), 1),
                           contended=None if contended is None else round(contended, 3))
                if floor is not None:
                    flops, moved = floor(mode)
                    floor_ms = self.roof.floor_ms(flops, moved)
                    row.update(floor_flops=flops, floor_bytes=moved, floor_ms=round(floor_ms, 4),
                               floor_fraction=round(floor_ms / ms, 4))
                busy = f", {contended:.0%} of rounds disturbed by other processes" if contended else ""
                print(f"  {impl:<16}{mode:<8}{ms:>10.3f} ms  ({reps} reps{busy})", flush=True)
        for impl_rows in rows.values():
            self.rows.extend(impl_rows)

    # ----- ops
    def run_case(self, case: Case, ops) -> None:
        s, v = case.shape, case.variant
        p = contenders.make_problem(case, self.device, self.dtype, self.args.seed)
        elem = p.x.element_size()
        if "ffn" in ops:
            print(f"[ffn] {case.label}  T={s.tokens} H={s.hidden} F={s.inter}", flush=True)
            base = dict(shape=case.label, op="ffn", tokens=s.tokens, hidden=s.hidden, inter=s.inter,
                        experts=v.experts, top_k=v.top_k, rank=v.rank, dtype=str(self.dtype)[6:])
            self.measure(contenders.ffn_contenders(p, self.wanted(contenders.FFN_IMPLS, 'ffn')), base,
                         floor=lambda mode: measure.ffn_floor(s.tokens, s.hidden, s.inter, mode, elem))
        label = f"{s.name}/E{v.experts}-K{v.top_k}"
        if "router" in ops and not any(r["shape"] == label and r["op"] == "router" for r in self.rows):
            print(f"[router] {label}  T={s.tokens} H={s.hidden} G={s.gcn_dim} L={s.gcn_layers}", flush=True)
            base = dict(shape=label, op="router", tokens=s.tokens, hidden=s.hidden, inter=None,
                        experts=v.experts, top_k=v.top_k, rank=None, dtype=str(self.dtype)[6:])
            self.measure(contenders.router_contenders(p, self.wanted(contenders.ROUTER_IMPLS, 'router')), base)
        del p
        gc.collect()

    def run_step(self, name, base_model, batch, seq, variant, real: bool = False, rounds: int = 3) -> None:
        """One step model's contenders. `real`: a pretrained model, timed as whole training steps
        (mode 'train': forward, loss, backward, AdamW step) in `rounds` interleaved rounds."""
        sp = contenders.make_step_problem(name, base_model, batch, seq, variant, self.device, self.args.seed)
        label = f"{name}/{variant.label}"
        print(f"[step] {label}  batch={batch} seq={seq}", flush=True)
        cfg = base_model.config
        base = dict(shape=label, op="step", tokens=sp.tokens, hidden=cfg.hidden_size,
                    inter=cfg.intermediate_size, experts=variant.experts, top_k=variant.top_k,
                    rank=variant.rank, dtype=str(self.dtype)[6:])
        impls = self.wanted(contenders.REAL_STEP_IMPLS if real else contenders.STEP_IMPLS, "step")
        settings = measure.Settings(warmup=1, min_reps=rounds, min_time_s=0.0, warmup_ms=10, rep_ms=40, retries=0) \
            if real else None
        self.measure(contenders.step_contenders(sp, impls), base, floor=lambda mode: (contenders.step_floor_flops(sp, mode), 0.0),
                     modes=("train",) if real else ("fwd", "fwd_bwd"), settings=settings)

    def check(self) -> None:
        """Agreement on tiny E8-K2-R8 (fp32 on CPU, fp32 on GPU): same function, same numbers."""
        case = Case(SHAPES["tiny"], SHAPES["tiny"].variants[0])
        p = contenders.make_problem(case, self.device, torch.float32, self.args.seed)
        cs = contenders.ffn_contenders(p) + contenders.router_contenders(p)
        rtol = 1e-4 if self.device.type == "cpu" else 1e-2  # Triton's fp32 dots may use TF32
        agreement = contenders.check_agreement(p, cs, atol=1e-4, rtol=rtol)
        self.checks = {k: {"max_abs_err": e, "ok": ok} for k, (e, ok) in agreement.items()}
        bad = [k for k, v in self.checks.items() if not v["ok"]]
        print("agreement with the reference on tiny/E8-K2-R8 (fp32): " + ", ".join(
            f"{k} {v['max_abs_err']:.1e}{'' if v['ok'] else ' MISMATCH'}" for k, v in self.checks.items()), flush=True)
        if bad:
            print(f"WARNING: {bad} disagree with gmoe-reference: their times are not comparable", flush=True)

    def save(self, complete: bool) -> None:
        report.add_ratios(self.rows)
        extra = {"complete": complete, "elapsed_s": round(self.elapsed(), 1), "skipped": self.skipped,
                 "checks": self.checks, "roof": {"gemm_flops_per_s": self.roof.gemm_flops_per_s,
                                                  "bytes_per_s": self.roof.bytes_per_s}}
        if self.args.json:
            report.write_json(self.args.json, self.stamp, self.rows, extra)
        if complete and self.args.csv:
            report.write_csv(self.args.csv, self.stamp, self.rows)


def verdict(rows) -> list[str]:
    """The targets' lines for cpu-medium/E8-K2-R8 (when those rows exist)."""
    get = {(r["shape"], r["impl"], r["mode"]): r for r in rows if r.get("ms")}
    out = []
    for shape in sorted({r["shape"] for r in rows if r["op"] == "ffn"}):
        ref_b, loop_b = get.get((shape, "gmoe-reference", "fwd_bwd")), get.get((shape, "loop", "fwd_bwd"))
        ref_f, mix_f = get.get((shape, "gmoe-reference", "fwd")), get.get((shape, "mixlora", "fwd"))
        peft_b = get.get((shape, "peft-lora", "fwd_bwd"))
        if ref_b and loop_b:
            out.append(f"{shape}: gmoe-reference fwd_bwd {ref_b['ms']:.1f} ms vs loop {loop_b['ms']:.1f} ms "
                       f"(speed-up {loop_b['ms'] / ref_b['ms']:.2f}x); saved {ref_b['saved_bytes'] / 2**20:.1f} "
                       f"vs {loop_b['saved_bytes'] / 2**20:.1f} MiB")
        if ref_f and mix_f:
            out.append(f"{shape}: gmoe-reference fwd {ref_f['ms']:.1f} ms vs mixlora {mix_f['ms']:.1f} ms "
                       f"(speed-up {mix_f['ms'] / ref_f['ms']:.2f}x)")
        if ref_b and peft_b:
            ratio = ref_b["ms"] / peft_b["ms"]
            out.append(f"{shape}: gmoe-reference fwd_bwd / peft-lora = {ratio:.2f} (target <= 1.15)")
    return out


def run_cases(runner: Runner, todo, ops) -> None:
    for case in todo:
        if runner.over_budget(case.label):
            continue
        runner.run_case(case, ops)
        runner.save(complete=False)
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()


def run_steps(runner: Runner, args, plan, device, dtype) -> None:
    names = args.step_models.split(",") if args.step_models else plan["step"]
    for name in names:
        if name not in STEP_MODELS and name not in REAL_STEP_MODELS:
            raise SystemExit(f"unknown step model {name!r}; known: {', '.join([*STEP_MODELS, *REAL_STEP_MODELS])}")
        if runner.over_budget(f"step {name}"):
            continue
        if name in REAL_STEP_MODELS:
            run_real_step(runner, REAL_STEP_MODELS[name], device, dtype)
            continue
        spec = STEP_MODELS[name]
        runner.run_step(name, contenders.build_llama(spec, device, dtype), spec.batch, spec.seq, spec.variant)
        runner.save(complete=False)
    if args.model:
        if not Path(args.model).is_dir():
            print(f"--model {args.model}: not a folder; the real-model step is skipped", flush=True)
            runner.skipped.append(f"step {args.model} (not found)")
        elif not runner.over_budget(f"step {args.model}"):
            import transformers
            model = transformers.AutoModelForCausalLM.from_pretrained(
                args.model, torch_dtype=dtype, local_files_only=True).to(device).eval()
            runner.run_step(Path(args.model).name, model, args.model_batch, args.model_seq,
                            STEP_MODELS["llama-tiny"].variant)
            runner.save(complete=False)


def run_real_step(runner: Runner, spec, device, dtype) -> None:
    """Load the pretrained model once (every contender deep-copies it) and time its training step."""
    try:
        from gmoe.finetune.assets import load_base_model
        start = time.perf_counter()
        model, _ = load_base_model(spec.name, dtype=dtype)
        print(f"loaded {spec.name} in {time.perf_counter() - start:.0f} s", flush=True)
    except Exception as err:  # noqa: BLE001 - a missing package must not sink the other rows
        print(f"step {spec.name}: cannot load the model ({type(err).__name__}: {err}); skipped", flush=True)
        runner.skipped.append(f"step {spec.name} ({type(err).__name__})")
        return
    runner.run_step(spec.name, model.to(device), spec.batch, spec.seq, spec.variant, real=True,
                    rounds=runner.args.step_rounds or spec.rounds)
    runner.save(complete=False)


def run_decode(runner: Runner, args, device, dtype) -> None:
    """Inference on the real model (benchmarks/contenders/decode.py): one block per thread count."""
    from benchmarks.contenders import decode

    try:
        threads = [int(t) for t in args.decode_threads.split(",") if t]
    except ValueError:
        raise SystemExit(f"--decode-threads {args.decode_threads!r}: comma-separated integers, e.g. 1,2") from None
    try:
        from gmoe.finetune.assets import load_base_model
        base, tokenizer = load_base_model(args.decode_model, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - a missing package must not sink the other rows
        print(f"decode: cannot load {args.decode_model} ({type(err).__name__}: {err}); skipped", flush=True)
        runner.skipped.append(f"decode {args.decode_model} ({type(err).__name__})")
        return
    settings = decode.DecodeSettings(rounds=args.decode_rounds or (3 if args.quick else 5), compiled=args.decode_compile)
    if args.decode_new:
        settings.new = args.decode_new
    wanted = [i for i in (*decode.DECODE_IMPLS, *decode.DECODE_EXTRA_IMPLS)
              if (runner.impls is None and i in decode.DECODE_IMPLS) or (runner.impls and i in runner.impls)]
    models = decode.build_models(base.to(device), settings, wanted)
    timing = measure.Settings(warmup=1, min_reps=settings.rounds, min_time_s=0.0, warmup_ms=10, rep_ms=40, retries=0)
    for count in threads:
        if runner.over_budget(f"decode {count} threads"):
            continue
        runner.rows.extend(decode.run_block(models, tokenizer, settings, count, device, args.decode_model, timing))
        runner.save(complete=False)
    torch.set_num_threads(threads[0])   # (the check's 2 × 64 steps at batch 8: the quickest block's threads)
    ids, mask = decode.prompt_batch(tokenizer, len(decode.PROMPTS), device)
    for impl in ("gmoe-graph", "gmoe-linear"):
        if impl in models and not args.no_check and not runner.over_budget(f"greedy identity {impl}"):
            runner.checks[f"greedy_identity/{impl}"] = check = decode.greedy_identity(
                models[impl], ids, mask, settings.check_tokens)
            print(f"greedy tokens, inference paths on vs off, {impl}: {check}", flush=True)
    runner.stamp["decode_threads"] = threads
    torch.set_num_threads(runner.stamp["threads"])


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    if os.environ.pop("GMOE_BACKEND", None):
        print("note: GMOE_BACKEND was set; ignored here (each contender names its backend)")
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    threads = measure.setup_threads(device, args.threads)
    settings = measure.QUICK if args.quick else measure.FULL
    ops = [o for o in args.ops.split(",") if o]
    unknown = set(ops) - {"ffn", "router", "step", "decode"}
    if unknown:
        raise SystemExit(f"--ops: unknown {sorted(unknown)}; choose from ffn,router,step,decode")

    stamp = report.machine_stamp(device, dtype, threads)
    if device.type == "cpu":
        meter = measure.Interference()
        time.sleep(0.5)
        stamp["busy_before"] = round(meter.share(), 3)
        if stamp["busy_before"] > 0.25:
            print(f"WARNING: other processes are using {stamp['busy_before']:.0%} of this CPU: times will be "
                  "noisy (contenders are interleaved and disturbed blocks retried, so ratios less so)")
    print(f"{stamp['device_name']} | {stamp['dtype']} | torch {stamp['torch']} | triton {stamp['triton']} | "
          f"{'quick' if args.quick else 'full'} run", flush=True)
    roof = measure.calibrate(device, dtype)
    print(f"roof: GEMM {roof.gemm_flops_per_s / 1e9:,.0f} GFLOP/s, copy {roof.bytes_per_s / 1e9:,.1f} GB/s", flush=True)
    runner = Runner(args, device, dtype, settings, roof, stamp)
    if not args.no_check:
        runner.check()

    plan = PLANS[(device.type, args.quick)]
    variants = args.variants.split(",") if args.variants else None
    todo = cases(args.shapes.split(","), variants=variants) if args.shapes else \
        [c for c in plan["ffn"] if not variants or c.variant.label in variants]
    routings = args.routings.split(",")
    if unknown := set(routings) - set(ROUTINGS):
        raise SystemExit(f"--routings: unknown {sorted(unknown)}; choose from {', '.join(ROUTINGS)}")
    todo = [dataclasses.replace(c, routing=r) for c in todo for r in routings]
    # Most important first, so a budget cut drops the least: every size's first variant, then
    # the training step, then the other variants.
    first = [c for c in todo if c.variant == c.shape.variants[0]]
    rest = [c for c in todo if c not in first]
    if "ffn" in ops or "router" in ops:
        run_cases(runner, first, ops)
    if "step" in ops:
        run_steps(runner, args, plan, device, dtype)
    if "ffn" in ops or "router" in ops:
        run_cases(runner, rest, ops)
    if "decode" in ops:
        run_decode(runner, args, device, dtype)

    stamp["load_after"] = report.load_average()
    runner.save(complete=True)
    print()
    print(report.table(runner.rows, stamp))
    if args.plot:
        for name in report.plot([r for r in runner.rows if r["op"] != "decode"], args.plot, stamp):
            print(f"wrote {name}")
        if any(r["op"] == "decode" for r in runner.rows):
            print(f"wrote {contenders.decode.plot(runner.rows, args.plot + '-decode.png', stamp)}")
    lines = verdict(runner.rows) + contenders.decode.verdict(runner.rows)
    if lines:
        print("\n" + "\n".join(lines))
    if runner.skipped:
        print(f"skipped (budget): {', '.join(runner.skipped)}")
    print(f"\nelapsed: {runner.elapsed():.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
