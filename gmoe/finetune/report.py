"""Writing results: atomic JSON, the versions and machine stamp, peak memory, and the
mean ± std summary table (Markdown + JSON) over seeds."""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import secrets

import torch

from .measure import REPORT_EXAMPLES


def write_bytes(path: str, data: bytes) -> None:
    """Write via a uniquely named temporary file in the same folder, flushed, then renamed: a reader
    (or a concurrent writer of the same path) never sees half a file. The file gets the mode the
    user's umask gives (mkstemp would make it 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{os.path.basename(path)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """`write_bytes` of the UTF-8 text (atomic)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, data) -> None:
    """`write_text` of the JSON (atomic)."""
    write_text(path, json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "gguf", "gmoe-kernels"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_memory_mib() -> dict:
    """GPU: torch.cuda.max_memory_allocated since the last reset; CPU: the process's peak RSS
    (ru_maxrss, which never goes down: in a multi-run process it is the peak so far)."""
    if torch.cuda.is_available():
        return {"kind": "cuda_max_memory_allocated", "mib": torch.cuda.max_memory_allocated() / 2**20}
    return {"kind": "process_peak_rss", "mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def percent_pm(mean, std, scale=100.0) -> str:
    """A mean and its std as percentages: "41.2 ± 0.8" ("41.2" without a std, "–" without a mean)."""
    if mean is None:
        return "–"
    return f"{scale * mean:.1f}" + (f" ± {scale * std:.1f}" if std is not None else "")


def binomial_se(p: float | None, n: int) -> float | None:
    """The standard error of an accuracy p measured on n independent examples: sqrt(p(1 − p)/n)."""
    if p is None or n <= 0:
        return None
    return math.sqrt(p * (1.0 - p) / n)


def routing_mean(runs: list[dict], when: str, field: str) -> float | None:
    """The mean over runs of one routing summary field ("injection" or "trained"), or None unless every
    run has it: a mean over the runs that happen to have routing would be labelled as all of them."""
    values = [((r.get("routing") or {}).get(when) or {}).get("summary", {}).get(field) for r in runs]
    if not values or None in values:
        return None
    return mean_std(values)[0]


def _per_task(row: dict, scores: list[dict], ns: dict) -> None:
    """Several tasks: each task's acc (mean ± std over seeds) under row["tasks"], and the standard error
    of the mean over tasks (multitask.macro_se) in place of the single binomial one."""
    from .multitask import macro_se

    if not scores or "tasks" not in scores[0]:
        return
    row["tasks"] = {}
    for t in scores[0]["tasks"]:
        mean, std = mean_std([s["tasks"][t]["acc"] for s in scores])
        row["tasks"][t] = {"acc_mean": mean, "acc_std": std,
                           "acc_norm_mean": mean_std([s["tasks"][t]["acc_norm"] for s in scores])[0]}
    row["acc_se"] = macro_se({t: v["acc_mean"] for t, v in row["tasks"].items()}, ns)


def summarize(task: str, zero_shot: dict, results: dict[str, list[dict]], chance: float | None = None) -> dict:
    """Rows: zero-shot, then one per method (mean ± std over its seeds, the binomial standard error
    of one run at the held-out size, and the routing telemetry after training, mean over seeds).
    Several tasks: acc is the mean over tasks, and each row lists every task's acc under "tasks"."""
    n = zero_shot["n"]
    ns = {t: r["n"] for t, r in zero_shot.get("tasks", {}).items()}
    rows = [{"method": "zero-shot", "seeds": [], "acc_values": [zero_shot["acc"]],
             "acc_norm_values": [zero_shot["acc_norm"]], "acc_mean": zero_shot["acc"], "acc_std": None,
             "acc_se": binomial_se(zero_shot["acc"], n), "acc_norm_mean": zero_shot["acc_norm"], "acc_norm_std": None,
             "trainable_params": 0, "train_tokens_per_s": None, "eval_tokens_per_s": zero_shot.get("tokens_per_s")}]
    _per_task(rows[0], [zero_shot], ns)
    for method, runs in results.items():
        acc = [r["finetuned"]["acc"] for r in runs]
        accn = [r["finetuned"]["acc_norm"] for r in runs]
        row = {"method": method, "seeds": [r["seed"] for r in runs], "acc_values": acc, "acc_norm_values": accn}
        row["acc_mean"], row["acc_std"] = mean_std(acc)
        row["acc_se"] = binomial_se(row["acc_mean"], n)
        row["acc_norm_mean"], row["acc_norm_std"] = mean_std(accn)
        row["trainable_params"] = runs[0]["trainable_params"]["trainable"] if runs else None
        row["train_tokens_per_s"] = mean_std([r["train"]["tokens_per_s"] for r in runs])[0]
        row["eval_tokens_per_s"] = mean_std([r["finetuned"]["tokens_per_s"] for r in runs])[0]
        row["train_seconds"] = mean_std([r["train"]["seconds"] for r in runs])[0]
        row.update(scale(runs))
        for field in ROUTING_COLUMNS:
            row[f"{field}_injection"] = routing_mean(runs, "injection", field)
            row[f"{field}_trained"] = routing_mean(runs, "trained", field)
        _per_task(row, [r["finetuned"] for r in runs], ns)
        rows.append(row)
    out = {"task": task, "rows": rows, "n": n, "chance": chance}
    if ns:
        out["tasks"], out["average"] = ns, "macro (mean over tasks)"
    return out


def scale(runs: list[dict]) -> dict:
    """How the runs were trained: the median step time (mean over runs), the largest peak memory of any
    rank, and the world size and engine (listed when the runs differ); records of older versions lack them."""
    steps = [r["train"].get("median_step_seconds") for r in runs]
    memory = [m.get("mib") for r in runs
              for m in r.get("distributed", {}).get("peak_memory_per_rank", [r.get("peak_memory") or {}])]
    setups = sorted({(r.get("distributed", {}).get("world_size", 1), r.get("distributed", {}).get("engine", "single"))
                     for r in runs})
    return {"median_step_seconds": mean_std([s for s in steps if s is not None])[0],
            "peak_memory_mib": max((m for m in memory if m is not None), default=None),
            "world": ", ".join(f"{w}×{e}" if w > 1 else "1" for w, e in setups) or None}


#: Routing fields of the compare table, at injection → after training (means over layers and seeds).
ROUTING_COLUMNS = ("busiest_share", "top_set_fraction", "effective_experts")


def _num(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _share(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_table(summary: dict, header: str) -> str:
    lines = [header, "",
             "| method | acc (%) | SE | acc_norm (%) | seeds | busiest expert | top-K set | effective experts "
             "| trainable params | train tok/s | step (s) | peak MiB / rank | processes | eval tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        seeds = "–" if r["method"] == "zero-shot" else str(len(r["seeds"]))
        tps = f"{r['train_tokens_per_s']:.0f}" if r.get("train_tokens_per_s") else "–"
        eps = f"{r['eval_tokens_per_s']:.0f}" if r.get("eval_tokens_per_s") else "–"
        params = f"{r['trainable_params']:,}" if r["trainable_params"] is not None else "–"
        se = "–" if r.get("acc_se") is None else f"{100 * r['acc_se']:.1f}"
        routing = [f"{_share(r.get(f'{f}_injection'))} → {_share(r.get(f'{f}_trained'))}"
                   if r.get(f"{f}_trained") is not None else "–" for f in ROUTING_COLUMNS]
        lines.append(f"| {r['method']} | {percent_pm(r['acc_mean'], r['acc_std'])} | {se} | "
                     f"{percent_pm(r['acc_norm_mean'], r['acc_norm_std'])} | {seeds} | {' | '.join(routing)} | "
                     f"{params} | {tps} | {_num(r.get('median_step_seconds'), '{:.3f}')} | "
                     f"{_num(r.get('peak_memory_mib'), '{:.0f}')} | {r.get('world') or '–'} | {eps} |")
    lines.append("")
    if summary.get("tasks"):
        lines += task_table(summary)
    chance = summary.get("chance")
    se = (f"SE: the standard error of one run's mean over tasks, sqrt(Σ p(1 − p)/n) / {len(summary['tasks'])}"
          if summary.get("tasks") else
          f"SE: the binomial standard error of one run's acc at n = {summary['n']} held-out examples, sqrt(p(1 − p)/n)")
    lines.append(("acc: the mean over tasks (macro average) of each task's acc; " if summary.get("tasks") else "acc: ")
                 + f"mean ± sample std (n − 1) over seeds; {se}"
                 + (f"; chance: {100 * chance:.1f} %" if chance is not None else "") + ". "
                 "Zero-shot is the bare base model on the same held-out part. Routing (GMoE methods, mean over "
                 f"layers and seeds, on up to {REPORT_EXAMPLES} held-out examples, at injection → after training): the busiest "
                 "expert's share of the top-K slots (balanced 1/E), the fraction of tokens on the layer's most "
                 "common top-K set (uniform routing: 1/C(E, K)) and the effective number of experts per token, "
                 "1/Σ_k w_k² of its top-K mixing weights (K when equal, 1 when one expert takes all). Train tok/s: "
                 "non-padding training tokens per second over all processes; step: the median optimizer step time; "
                 "peak MiB: the largest of any rank (GPU: max allocated; CPU: peak RSS); processes: N×engine.")
    return "\n".join(lines) + "\n"


def task_table(summary: dict) -> list[str]:
    """Several tasks: acc (%) per task and method (mean ± std over seeds), and the mean over tasks."""
    tasks = list(summary["tasks"])
    lines = ["| method | " + " | ".join(f"{t} (n {summary['tasks'][t]})" for t in tasks) + " | mean |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for r in summary["rows"]:
        cells = [percent_pm(r["tasks"][t]["acc_mean"], r["tasks"][t]["acc_std"]) if t in r.get("tasks", {}) else "–"
                 for t in tasks]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {percent_pm(r['acc_mean'], r['acc_std'])} |")
    return lines + [""]
