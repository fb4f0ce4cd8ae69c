"""Report the rows: a stdout table, JSON, CSV, PNG bar charts, and the machine stamp.

Also a small CLI over a results file written by run.py:
  python benchmarks/report.py benchmarks/results/cpu-2core.json            # the table
  python benchmarks/report.py FILE.json --markdown                          # README table
  python benchmarks/report.py FILE.json --summary                           # short summary
  python benchmarks/report.py FILE.json --plot benchmarks/results/cpu-2core # PNG charts
"""
from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ["impl", "shape", "op", "mode", "ms", "tokens_per_s", "saved_bytes", "peak_bytes",
          "ratio_peft", "ratio_loop", "floor_ms", "floor_fraction", "floor_flops", "floor_bytes",
          "tokens", "hidden", "inter", "experts", "top_k", "rank", "dtype", "reps", "contended", "note", "error"]
STAMP_FIELDS = ["device_name", "torch", "triton", "transformers", "commit", "date"]


# --------------------------------------------------------------------------- machine stamp
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """1-minute load average (None where the OS has none): how busy the machine was."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_stamp(device: torch.device, dtype: torch.dtype, threads: int, argv=None) -> dict:
    """Who measured what: device, versions, commit and date (stamped on every JSON/CSV)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({threads} threads)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device.type, "device_name": name, "cores": os.cpu_count(), "threads": threads,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "triton": _version("triton"), "transformers": _version("transformers"),
        "peft": _version("peft"), "mixlora": _version("mixlora"), "torch_geometric": _version("torch-geometric"),
        "python": platform.python_version(), "cuda": torch.version.cuda,
        "commit": _git("rev-parse", "HEAD"), "dirty": bool(dirty) if dirty is not None else None,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv if argv is not None else sys.argv), "load_before": load_average(),
    }


# --------------------------------------------------------------------------- rows
def add_ratios(rows: list[dict]) -> list[dict]:
    """ratio_peft / ratio_loop: ms over the peft-lora / loop row of the same shape, op and mode.

    Where PEFT is not installed, the lora-plain row (the same LoRA maths) stands in for peft-lora.
    """
    base = {(r["shape"], r["op"], r["mode"], r["impl"]): r["ms"] for r in rows if r.get("ms")}
    for r in rows:
        for impl, key in (("peft-lora", "ratio_peft"), ("loop", "ratio_loop")):
            other = base.get((r["shape"], r["op"], r["mode"], impl))
            if other is None and impl == "peft-lora":
                other = base.get((r["shape"], r["op"], r["mode"], "lora-plain"))
            r[key] = round(r["ms"] / other, 4) if r.get("ms") and other else None
    return rows


def _mib(n):
    return None if n is None else n / 2**20


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def table(rows: list[dict], stamp: dict | None = None) -> str:
    """The readable stdout table, one block per (op, shape)."""
    head = (f"{'impl':<16}{'mode':<8}{'ms':>10}{'tok/s':>11}{'x peft':>8}{'x loop':>8}"
            f"{'saved MiB':>11}{'peak MiB':>10}{'floor':>7}  note")
    out = []
    if stamp:
        out.append(f"# {stamp['device_name']} | {stamp['dtype']} | torch {stamp['torch']} | triton "
                   f"{stamp['triton']} | transformers {stamp['transformers']} | "
                   f"{(stamp['commit'] or '?')[:10]}{'+dirty' if stamp.get('dirty') else ''} | {stamp['date']}")
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"]), []).append(r)
    for (op, shape), members in groups.items():
        first = members[0]
        dims = f"T={first['tokens']} H={first.get('hidden')} F={first.get('inter')}" if op == "ffn" else \
            f"T={first['tokens']} H={first.get('hidden')}"
        out.append(f"\n[{op}] {shape}  ({dims})")
        out.append(head)
        for r in members:
            if r.get("error"):
                out.append(f"{r['impl']:<16}{r['mode'] or '-':<8}{'n/a':>10}  {r['error']}")
                continue
            floor = f"{100 * r['floor_fraction']:.0f}%" if r.get("floor_fraction") else "-"
            note = r.get("note") or ""
            if r.get("contended"):
                note = f"[{r['contended']:.0%} of rounds disturbed] {note}"
            out.append(
                f"{r['impl']:<16}{r['mode']:<8}{r['ms']:>10.3f}{_fmt(r['tokens_per_s'], ',.0f'):>11}"
                f"{_fmt(r['ratio_peft'], '.2f'):>8}{_fmt(r['ratio_loop'], '.2f'):>8}"
                f"{_fmt(_mib(r['saved_bytes']), '.1f'):>11}{_fmt(_mib(r['peak_bytes']), '.1f'):>10}"
                f"{floor:>7}  {note}")
    return "\n".join(out)


def write_json(path, stamp: dict, rows: list[dict], extra: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": stamp, **(extra or {}), "rows": [{k: r.get(k) for k in FIELDS} for r in rows]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def write_csv(path, stamp: dict, rows: list[dict]) -> None:
    """One row per measurement, each stamped with device, versions, commit and date."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS + STAMP_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: r.get(k) for k in FIELDS}, **{k: stamp.get(k) for k in STAMP_FIELDS}})


def load(path) -> tuple[dict, list[dict]]:
    doc = json.loads(Path(path).read_text())
    return doc["machine"], doc["rows"]


# --------------------------------------------------------------------------- plots
def plot(rows: list[dict], prefix, stamp: dict | None = None) -> list[str]:
    """PNG bar charts per (op, shape): time ratio to peft-lora (routers: ms) and memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    groups: dict[tuple, list] = {}
    for r in rows:
        if r.get("ms") is not None:
            groups.setdefault((r["op"], r["shape"]), []).append(r)
    for (op, shape), members in groups.items():
        impls = list(dict.fromkeys(r["impl"] for r in members))
        modes = ["fwd", "fwd_bwd"]
        use_ratio = any(r.get("ratio_peft") for r in members)
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 3.8))
        width = 0.38
        for j, mode in enumerate(modes):
            values = []
            for impl in impls:
                r = next((m for m in members if m["impl"] == impl and m["mode"] == mode), None)
                values.append((r.get("ratio_peft") if use_ratio else r["ms"]) if r else 0.0)
            bars = ax_t.bar([i + (j - 0.5) * width for i in range(len(impls))], [v or 0 for v in values],
                            width, label=mode)
            ax_t.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=7)
        if use_ratio:
            ax_t.axhline(1.0, color="grey", lw=0.8)
            ax_t.axhline(1.15, color="red", lw=0.8, ls="--", label="1.15x target")
        ax_t.set_ylabel("time / peft-lora" if use_ratio else "ms")
        ax_t.set_xticks(range(len(impls)), impls, rotation=30, ha="right", fontsize=8)
        ax_t.legend(fontsize=7)
        ax_t.set_title(f"{op} {shape}: {'time ratio' if use_ratio else 'time'}", fontsize=9)
        mem_key = "peak_bytes" if any(r.get("peak_bytes") for r in members) else "saved_bytes"
        mem = []
        for impl in impls:
            r = next((m for m in members if m["impl"] == impl and m.get(mem_key) is not None
                      and m["mode"] == ("fwd_bwd" if mem_key == "peak_bytes" else "fwd")), None)
            mem.append(_mib(r[mem_key]) if r else None)
        bars = ax_m.bar(range(len(impls)), [v or 0.0 for v in mem], color="tab:green")
        ax_m.bar_label(bars, labels=[f"{v:.0f}" if v is not None else "n/a" for v in mem], fontsize=7)
        ax_m.set_xticks(range(len(impls)), impls, rotation=30, ha="right", fontsize=8)
        ax_m.set_ylabel("MiB")
        ax_m.set_title(f"{'peak (fwd+bwd)' if mem_key == 'peak_bytes' else 'saved for backward'}", fontsize=9)
        if stamp:
            fig.suptitle(f"{stamp['device_name']} · {stamp['dtype']} · {stamp['date'][:10]}", fontsize=8)
        fig.tight_layout()
        name = f"{prefix}-{op}-{shape.replace('/', '_')}.png"
        fig.savefig(name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


# --------------------------------------------------------------------------- summaries
def markdown(rows: list[dict], stamp: dict) -> str:
    """The README table: every timed row, grouped by op and shape."""
    lines = [f"Machine: {stamp['device_name']}, {stamp['dtype']}; torch {stamp['torch']}, "
             f"transformers {stamp['transformers']}, triton {stamp['triton']}; commit "
             f"`{(stamp['commit'] or '?')[:10]}`; {stamp['date'][:10]}.", "",
             "| op | shape | impl | mode | ms | tokens/s | × peft-lora | × loop | saved MiB | peak MiB | floor |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            continue
        floor = f"{100 * r['floor_fraction']:.0f}%" if r.get("floor_fraction") else "–"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['impl']} | {r['mode']} | {r['ms']:.2f} | "
            f"{_fmt(r['tokens_per_s'], ',.0f', '–')} | {_fmt(r['ratio_peft'], '.2f', '–')} | "
            f"{_fmt(r['ratio_loop'], '.2f', '–')} | {_fmt(_mib(r['saved_bytes']), '.1f', '–')} | "
            f"{_fmt(_mib(r['peak_bytes']), '.1f', '–')} | {floor} |")
    return "\n".join(lines)


def summary(rows: list[dict], stamp: dict | None = None) -> str:
    """A short table: this package's rows with their ratios, one line each."""
    ours = {"gmoe-triton", "gmoe-reference", "graph-triton", "graph-reference"}
    out = []
    if stamp:
        out.append(f"summary: {stamp['device_name']} {stamp['dtype']} {stamp['date']}")
    out.append(f"{'op':<7}{'shape':<24}{'impl':<16}{'mode':<8}{'ms':>9}{'x peft':>8}{'x loop':>8}"
               f"{'saved MiB':>10}{'peak MiB':>10}")
    for r in rows:
        if r["impl"] not in ours:
            continue
        if r.get("error"):
            out.append(f"{r['op']:<7}{r['shape']:<24}{r['impl']:<16}{'-':<8}  n/a: {r['error'][:60]}")
            continue
        out.append(f"{r['op']:<7}{r['shape']:<24}{r['impl']:<16}{r['mode']:<8}{r['ms']:>9.2f}"
                   f"{_fmt(r['ratio_peft'], '.2f'):>8}{_fmt(r['ratio_loop'], '.2f'):>8}"
                   f"{_fmt(_mib(r['saved_bytes']), '.1f'):>10}{_fmt(_mib(r['peak_bytes']), '.1f'):>10}")
    return "\n".join(out)


def kernel_summary(path) -> str:
    """Worst relative error per (case, dtype) from tests/gpu/test_kernels.py's GMOE_GPU_REPORT lines."""
    worst: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        e = json.loads(line)
        key = (e["case"], e["dtype"])
        w = worst.setdefault(key, {"rel_err": 0.0, "tensor": "-", "ok": True, "mismatch": None})
        w["ok"] = w["ok"] and e["ok"]
        if e.get("mismatch") is not None:
            w["mismatch"] = e["mismatch"]
        if e.get("rel_err") is not None and e["rel_err"] >= w["rel_err"]:
            w.update(rel_err=e["rel_err"], tensor=e["tensor"])
    out = [f"{'kernel case':<30}{'dtype':<10}{'worst rel err':>14}  {'(tensor)':<22}{'index mismatch':>15}  ok"]
    for (case, dtype), w in worst.items():
        mism = "-" if w["mismatch"] is None else f"{w['mismatch']:.2%}"
        ok = "yes" if w["ok"] else "NO"
        out.append(f"{case:<30}{dtype:<10}{w['rel_err']:>14.2e}  {w['tensor']:<22}{mism:>15}  {ok}")
    return "\n".join(out)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", help="a JSON file written by benchmarks/run.py --json")
    parser.add_argument("--kernels", metavar="JSONL", help="summarise tests/gpu/test_kernels.py's GMOE_GPU_REPORT file")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--summary", action="store_true", help="print the short summary")
    parser.add_argument("--plot", metavar="PREFIX", help="write PNG charts PREFIX-<op>-<shape>.png")
    args = parser.parse_args(argv)
    if args.kernels:
        print(kernel_summary(args.kernels))
    if not args.results:
        return 0
    stamp, rows = load(args.results)
    if args.plot:
        for name in plot(rows, args.plot, stamp):
            print(name)
    if args.markdown:
        print(markdown(rows, stamp))
    elif args.summary:
        print(summary(rows, stamp))
    elif not args.plot:
        print(table(rows, stamp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
