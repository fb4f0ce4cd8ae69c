"""The routing study's tables, read from the records of its runs.

    python -m benchmarks.routing_study [--root benchmarks/results/routing-study] [--reference lora]

Reads every <task>/<method>/seed<S>/results.json under --root (the job's records, copied there by
benchmarks/collect_runs.sh) and writes <root>/summary.md:
- the study's accuracy methods on every task side by side (the README's table);
- accuracy, per task and method: acc mean ± sample std over seeds, the number of seeds, the zero-shot
  score, the chance level (the mean of 1/choices over the held-out part) and one run's binomial standard
  error; each method's difference to --reference, paired per example; and the fraction of examples on
  which it gives the reference's answer (same seed). Every run is scored on the
  same held-out examples, so the difference of the seed-averaged per-example correctness d_i has the
  standard error sd(d)/√n, far smaller than two independent binomial errors when methods agree on
  most examples;
- routing over training, per task: `<task>/routing-seed0.png`, every method's seed-0 run on one figure;
- routing, per task and method: the busiest expert's share, the fraction of tokens on the most common
  top-K set, the idle experts and σ, at injection → after training (means over layers), for seed 0
  (where every method has a run) and averaged over the seeds of the methods that have several.
The held-out gold answers come from the job's own split (`prepare_data` with each run's recorded config).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import statistics

from gmoe.finetune import plots, report
from gmoe.finetune.job import JobConfig, prepare_data

ROUTING_FIELDS = (("busiest_share", "busiest expert", "{:.2f}"), ("top_set_fraction", "top-K set", "{:.2f}"),
                  ("idle_experts", "idle experts", "{:.1f}"), ("normal_std", "σ", "{:.3f}"))
HEADLINE = ["lora", "mixlora", "gmoe", "gmoe-balanced"]  # the study's accuracy methods, run on every task
SPLIT_KEYS = ("source", "split_seed", "eval_fraction", "eval_size", "source_size")


def load_runs(root: str) -> dict[str, dict[str, list[dict]]]:
    """{task: {method: [results of its seeds, by seed]}}."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "*", "seed*", "results.json"))):
        result = report.read_json(path)
        runs.setdefault(result["task"], {}).setdefault(result["method"], []).append(result)
    for methods in runs.values():
        for results in methods.values():
            results.sort(key=lambda r: r["seed"])
    return runs


def held_out(result: dict) -> list:
    """The held-out examples in scoring order, rebuilt from the run's recorded config."""
    names = {f.name for f in dataclasses.fields(JobConfig)}
    data = prepare_data(JobConfig(**{k: v for k, v in result["config"].items() if k in names}))
    recorded = result["split"]
    if any(data.split.get(k) != recorded.get(k) for k in SPLIT_KEYS) or len(data.eval) != result["finetuned"]["n"]:
        raise ValueError(f"the held-out part of {result['task']} rebuilt here differs from the one its runs "
                         f"recorded ({SPLIT_KEYS}): the gold answers cannot be matched to the predictions")
    return data.eval


def correctness(results: list[dict], golds: list[int]) -> list[float]:
    """Per held-out example: the fraction of the runs (seeds) that chose the gold answer."""
    per_run = [[float(p == g) for p, g in zip(r["finetuned"]["predictions"], golds, strict=True)] for r in results]
    return [statistics.fmean(col) for col in zip(*per_run)]


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a − b over examples and its standard error sd(a − b)/√n."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


def agreement(results: list[dict], reference: list[dict]) -> float | None:
    """The fraction of held-out examples on which a run picks the same answer as the reference's run
    of the same seed, averaged over the seeds both have (None when they share none)."""
    by_seed = {r["seed"]: r["finetuned"]["predictions"] for r in reference}
    shared = [(r["finetuned"]["predictions"], by_seed[r["seed"]]) for r in results if r["seed"] in by_seed]
    if not shared:
        return None
    return statistics.fmean(statistics.fmean(float(a == b) for a, b in zip(p, q, strict=True)) for p, q in shared)


def task_accuracy(methods: dict[str, list[dict]], reference: str) -> dict:
    """n, chance, the zero-shot score, the mean fine-tuned acc, and per method: seeds, acc and acc_norm
    (mean, std over seeds) and the paired difference to `reference` (mean, SE; None for itself or when
    it has no runs)."""
    first = next(iter(methods.values()))[0]
    examples = held_out(first)
    golds = [ex.gold for ex in examples]
    ref = correctness(methods[reference], golds) if reference in methods else None
    rows = {}
    for method, results in methods.items():
        delta = agree = None
        if ref is not None and method != reference:
            delta = paired_difference(correctness(results, golds), ref)
            agree = agreement(results, methods[reference])
        rows[method] = {"seeds": len(results), "acc": report.mean_std([r["finetuned"]["acc"] for r in results]),
                        "acc_norm": report.mean_std([r["finetuned"]["acc_norm"] for r in results]), "delta": delta,
                        "agreement": agree}
    return {"n": len(examples), "chance": statistics.fmean(1.0 / ex.num_choices for ex in examples),
            "zero_shot": first["zero_shot"], "rows": rows, "reference": reference,
            "typical": statistics.fmean(r["finetuned"]["acc"] for results in methods.values() for r in results)}


def accuracy_table(task: str, acc: dict) -> list[str]:
    zero = acc["zero_shot"]
    lines = [f"**{task}**: {_about(acc)}", "",
             f"| method | seeds | acc (%) | Δ vs {acc['reference']} (paired SE) | same answer as {acc['reference']} "
             "| acc_norm (%) |", "|---|---:|---:|---:|---:|---:|",
             f"| zero-shot | – | {100 * zero['acc']:.1f} | – | – | {100 * zero['acc_norm']:.1f} |"]
    for method, row in acc["rows"].items():
        same = "–" if row["agreement"] is None else f"{100 * row['agreement']:.1f} %"
        lines.append(f"| `{method}` | {row['seeds']} | {report.percent_pm(*row['acc'])} | {_delta(row)} | {same} "
                     f"| {report.percent_pm(*row['acc_norm'])} |")
    return lines + [""]


def headline_table(accuracy: dict[str, dict], methods: list[str]) -> list[str]:
    """`methods` on every task side by side: acc (seeds) and Δ, for the README."""
    tasks = list(accuracy)
    reference = next(iter(accuracy.values()))["reference"]
    lines = ["| method | " + " | ".join(f"{t} acc (%) | Δ vs {reference}" for t in tasks) + " |",
             "|---|" + "---:|---:|" * len(tasks),
             "| zero-shot | " + " | ".join(f"{100 * accuracy[t]['zero_shot']['acc']:.1f} | –" for t in tasks) + " |"]
    for method in [m for m in methods if any(m in a["rows"] for a in accuracy.values())]:
        cells = []
        for t in tasks:
            row = accuracy[t]["rows"].get(method)
            cells.append("– | –" if row is None else f"{report.percent_pm(*row['acc'])} ({row['seeds']}) | {_delta(row)}")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    notes = "; ".join(f"{t}: {_about(a)}" for t, a in accuracy.items())
    return lines + ["", f"acc: mean ± std over seeds (their number in brackets). {notes}.", ""]


def _about(acc: dict) -> str:
    return (f"n = {acc['n']} held-out examples, chance {100 * acc['chance']:.1f} %, one run's binomial SE "
            f"±{100 * report.binomial_se(acc['typical'], acc['n']):.1f} points (at the mean fine-tuned acc, "
            f"{100 * acc['typical']:.1f} %)")


def _delta(row: dict) -> str:
    if row["delta"] is None:
        return "–"
    mean, se = row["delta"]
    return f"{100 * mean:+.1f} ({100 * se:.1f})"


def routing_table(task: str, methods: dict[str, list[dict]], seed: int | None = None) -> list[str]:
    """One seed's runs (every method has seed 0: the options are compared there), or all seeds of the
    methods that have several."""
    if seed is None:
        methods = {m: rs for m, rs in methods.items() if len(rs) > 1}
        which = "means over layers, then over seeds"
    else:
        methods = {m: [r for r in rs if r["seed"] == seed] for m, rs in methods.items()}
        which = f"seed {seed}, means over layers"
    methods = {m: rs for m, rs in methods.items() if rs}
    if not methods:
        return []
    lines = [f"**{task}**, routing at injection → after training ({which}):", "",
             "| method | " + ("" if seed is not None else "seeds | ")
             + " | ".join(label for _, label, _ in ROUTING_FIELDS) + " |",
             "|---|" + "---:|" * (len(ROUTING_FIELDS) + (seed is None))]
    for method, results in methods.items():
        if not all((r.get("routing") or {}).get("trained") for r in results):
            continue  # lora: no router
        cells = []
        for field, _, fmt in ROUTING_FIELDS:
            when = [[r["routing"][w]["summary"].get(field) for r in results] for w in ("injection", "trained")]
            cells.append("–" if None in when[0] + when[1] else
                         f"{fmt.format(statistics.fmean(when[0]))} → {fmt.format(statistics.fmean(when[1]))}")
        count = "" if seed is not None else f"{len(results)} | "
        lines.append(f"| `{method}` | {count}" + " | ".join(cells) + " |")
    return lines + [""]


def _rank(method: str) -> tuple[int, str]:
    """Baselines, the paper's method and the combination first; then the single options."""
    return (HEADLINE.index(method), "") if method in HEADLINE else (len(HEADLINE), method)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="benchmarks/results/routing-study")
    parser.add_argument("--reference", default="lora", help="the method every other one is compared with")
    args = parser.parse_args(argv)
    runs = load_runs(args.root)
    if not runs:
        raise SystemExit(f"no results.json under {args.root}/<task>/<method>/seed<S>/")
    machines = sorted({f"{r['machine'].get('cpu', '?')}" for m in runs.values() for rs in m.values() for r in rs})
    lines = ["# Routing study: tables", "",
             f"Generated by `python -m benchmarks.routing_study` from the `results.json` beside this file. "
             f"Machine(s): {', '.join(machines)}. acc: mean ± sample std over seeds; Δ: the paired difference of the "
             "seed-averaged per-example correctness, in points, with its standard error.", ""]
    runs = {task: dict(sorted(methods.items(), key=lambda item: _rank(item[0]))) for task, methods in runs.items()}
    accuracy = {task: task_accuracy(methods, args.reference) for task, methods in runs.items()}
    lines += ["## The methods compared on every task", ""] + headline_table(accuracy, HEADLINE)
    for task, methods in runs.items():
        lines += [f"## {task}", ""] + accuracy_table(task, accuracy[task])
        figure = plots.routing_by_method(
            {m: rs[0].get("train", {}).get("routing_history") for m, rs in methods.items() if rs[0]["seed"] == 0},
            os.path.join(args.root, task, "routing-seed0.png"), f"{task}, seed 0: routing over training")
        if figure:
            lines += [f"![routing over training, seed 0]({task}/routing-seed0.png)", ""]
        lines += routing_table(task, methods, seed=0)
        lines += routing_table(task, methods)
    text = "\n".join(lines)
    report.write_text(os.path.join(args.root, "summary.md"), text)
    print(text)
    return text


if __name__ == "__main__":
    main()
