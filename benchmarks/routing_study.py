"""The routing study's tables, read from the records of its runs.

    python -m benchmarks.routing_study [--root benchmarks/results/routing-study] [--reference lora]

Reads every <task>/<method>/seed<S>/results.json under --root (the job's records, copied there by
benchmarks/collect_runs.sh) and writes <root>/summary.md:
- the study's accuracy methods on every task side by side (the README's table);
- accuracy, per task and method: acc mean ± sample std over seeds, the number of seeds, the zero-shot
  score, the chance level (the mean of 1/choices over the held-out part) and one run's binomial standard
  error; the paired differences to zero-shot and to --reference (on the seeds both have), and how often
  a method gives the reference's answer. Every run is scored on the same held-out examples, so a
  difference is taken per (seed, example): d[s][i], the two runs of seed s on example i (or the run and
  zero-shot). Its mean has a standard error with both sources of variation (`two_level_se`): the
  examples (the held-out set is a sample), and the training seeds (a seed moves every example of a run
  together); a method with one seed has the examples' part only and is marked † (single seed);
- routing over training, per task: `<task>/routing-seed0.png`, every method's seed-0 run on one figure;
- routing, per task and method: the busiest expert's share, the fraction of tokens on the most common
  top-K set (uniform routing: 1/C(E, K)), the idle experts, the effective experts per token (records
  that have it) and σ, at injection → after training (means over layers), for seed 0
  (where every method has a run) and averaged over the seeds of the methods that have several.
The held-out gold answers come from the job's own split (`prepare_data` with each run's recorded config).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import statistics

from gmoe.finetune import plots, report
from gmoe.finetune.job import JobConfig, prepare_data

ROUTING_FIELDS = (("busiest_share", "busiest expert", "{:.2f}"), ("top_set_fraction", "top-K set", "{:.2f}"),
                  ("idle_experts", "idle experts", "{:.1f}"), ("effective_experts", "effective experts", "{:.2f}"),
                  ("normal_std", "σ", "{:.3f}"))
SINGLE_SEED = "†"  # marks a method with one seed: its standard errors count the examples only
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


def held_out(methods: dict[str, list[dict]]) -> list:
    """The held-out examples in scoring order, rebuilt from the first run's recorded config; every run
    of the task must have recorded the same split (else its predictions would meet the wrong answers)."""
    first = next(iter(methods.values()))[0]
    data = prepare_data(JobConfig.from_fields(first["config"]))
    for result in (r for results in methods.values() for r in results):
        recorded = result["split"]
        if any(data.split.get(k) != recorded.get(k) for k in SPLIT_KEYS) or len(data.eval) != result["finetuned"]["n"]:
            raise ValueError(f"{result['task']} {result['method']} seed {result['seed']}: its held-out part differs "
                             f"from the one rebuilt here ({', '.join(SPLIT_KEYS)}): the gold answers cannot be "
                             "matched to its predictions")
    return data.eval


def two_level_se(d: list[list[float]]) -> tuple[float, float]:
    """The standard error of the mean of d[s][i] (S seeds × n examples, every seed on every example),
    counting the seeds and the examples as samples: a two-way crossed random-effects model
    d[s][i] = μ + a_s + b_i + e_si, whose mean has the variance σ²_a/S + σ²_b/n + σ²_e/(S n).

    With the mean squares of seeds, examples and residual (MS_a, MS_b, MS_e, the two-way ANOVA without
    replication), σ²_e = MS_e, σ²_a = max(0, (MS_a − MS_e)/n), σ²_b = max(0, (MS_b − MS_e)/S). Without
    the seed term this is the standard error over examples of the seed-averaged d (MS_b/(S n) when no
    clamp acts), so the seed part adds σ²_a/S to it. Returns (SE, the seed part's share of the variance).
    One seed: sd(d)/√n, the examples only (seed part 0). σ²_a rests on S − 1 degrees of freedom: with 3
    seeds the SE is itself uncertain by tens of percent.
    """
    num_seeds, n = len(d), len(d[0])
    if num_seeds == 1:
        return statistics.stdev(d[0]) / math.sqrt(n), 0.0
    grand = statistics.fmean(x for row in d for x in row)
    seed_means = [statistics.fmean(row) for row in d]
    example_means = [statistics.fmean(col) for col in zip(*d, strict=True)]
    ms_seed = n * sum((m - grand) ** 2 for m in seed_means) / (num_seeds - 1)
    ms_example = num_seeds * sum((m - grand) ** 2 for m in example_means) / (n - 1)
    ms_residual = sum((d[s][i] - seed_means[s] - example_means[i] + grand) ** 2
                      for s in range(num_seeds) for i in range(n)) / ((num_seeds - 1) * (n - 1))
    seed_var = max(0.0, (ms_seed - ms_residual) / n) / num_seeds
    variance = seed_var + max(0.0, (ms_example - ms_residual) / num_seeds) / n + ms_residual / (num_seeds * n)
    return math.sqrt(variance), seed_var / variance if variance > 0 else 0.0


def paired_difference(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """a[s][i] − b[s][i] (per seed and example; b may be one row, zero-shot's, for every seed): the
    mean over seeds and examples and its standard error with both counted (`two_level_se`)."""
    d = [[x - y for x, y in zip(row, b[s] if len(b) > 1 else b[0], strict=True)] for s, row in enumerate(a)]
    return statistics.fmean(x for row in d for x in row), two_level_se(d)[0]


def per_run(predictions: list[list[int]], golds: list[int]) -> list[list[float]]:
    """Per run (its predictions), per held-out example: 1.0 where it chose the gold answer."""
    return [[float(p == g) for p, g in zip(preds, golds, strict=True)] for preds in predictions]


def versus(results: list[dict], reference: list[dict], golds: list[int]) -> dict | None:
    """A method against the reference on the seeds both have: the paired difference (mean, SE over
    seeds and examples), the fraction of examples with the same answer, and the number of shared seeds
    (None when none)."""
    by_seed = {r["seed"]: r["finetuned"]["predictions"] for r in reference}
    pairs = [(r["finetuned"]["predictions"], by_seed[r["seed"]]) for r in results if r["seed"] in by_seed]
    if not pairs:
        return None
    mine, theirs = [p for p, _ in pairs], [q for _, q in pairs]
    same = statistics.fmean(statistics.fmean(float(a == b) for a, b in zip(p, q, strict=True)) for p, q in pairs)
    return {"delta": paired_difference(per_run(mine, golds), per_run(theirs, golds)),
            "same": same, "seeds": len(pairs)}


def task_accuracy(methods: dict[str, list[dict]], reference: str) -> dict:
    """n, chance, the zero-shot score, the mean fine-tuned acc, and per method: seeds, acc and acc_norm
    (mean, std over seeds), the paired difference to zero-shot, and `versus` the reference."""
    examples = held_out(methods)
    golds = [ex.gold for ex in examples]
    zero = next(iter(methods.values()))[0]["zero_shot"]
    zero_correct = per_run([zero["predictions"]], golds)
    rows = {}
    for method, results in methods.items():
        rows[method] = {
            "seeds": len(results), "acc": report.mean_std([r["finetuned"]["acc"] for r in results]),
            "acc_norm": report.mean_std([r["finetuned"]["acc_norm"] for r in results]),
            "gain": paired_difference(per_run([r["finetuned"]["predictions"] for r in results], golds),
                                      zero_correct),
            "versus": None if method == reference or reference not in methods
            else versus(results, methods[reference], golds)}
    return {"n": len(examples), "chance": statistics.fmean(1.0 / ex.num_choices for ex in examples),
            "zero_shot": zero, "rows": rows, "reference": reference, "has_reference": reference in methods,
            "typical": statistics.fmean(r["finetuned"]["acc"] for results in methods.values() for r in results)}


def accuracy_table(task: str, acc: dict) -> list[str]:
    zero, ref = acc["zero_shot"], acc["reference"]
    lines = [f"**{task}**: {_about(acc)}", "",
             f"| method | seeds | acc (%) | Δ vs zero-shot | Δ vs {ref} | same answer as {ref} | acc_norm (%) |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| zero-shot | – | {100 * zero['acc']:.1f} | – | – | – | {100 * zero['acc_norm']:.1f} |"]
    for method, row in acc["rows"].items():
        vs = row["versus"]
        same = "–" if vs is None else f"{100 * vs['same']:.1f} %"
        lines.append(f"| {_name(method, row['seeds'])} | {row['seeds']} | {report.percent_pm(*row['acc'])} | {_delta(row['gain'])} "
                     f"| {_versus(vs)} | {same} | {report.percent_pm(*row['acc_norm'])} |")
    if not acc["has_reference"]:
        lines.append(f"\nNo `{ref}` runs on {task} yet: nothing to compare with.")
    if any(row["seeds"] == 1 for row in acc["rows"].values()):
        lines.append(f"\n{SINGLE_SEED} a single seed: its standard errors count the held-out examples only, "
                     "not the seed-to-seed variation.")
    return lines + [""]


def _name(method: str, seeds: int) -> str:
    return f"`{method}`" + (f" {SINGLE_SEED}" if seeds == 1 else "")


def headline_table(accuracy: dict[str, dict], methods: list[str]) -> list[str]:
    """`methods` on every task side by side: acc, seeds and Δ vs the reference, for the README."""
    tasks = list(accuracy)
    reference = next(iter(accuracy.values()))["reference"]
    lines = ["| method | " + " | ".join(f"{t} acc (%) | seeds | Δ vs {reference}" for t in tasks) + " |",
             "|---|" + "---:|---:|---:|" * len(tasks),
             "| zero-shot | " + " | ".join(f"{100 * accuracy[t]['zero_shot']['acc']:.1f} | – | –" for t in tasks) + " |"]
    for method in [m for m in methods if any(m in a["rows"] for a in accuracy.values())]:
        cells = []
        for t in tasks:
            row = accuracy[t]["rows"].get(method)
            cells.append("– | – | –" if row is None else
                         f"{report.percent_pm(*row['acc'])} | {row['seeds']} | {_versus(row['versus'])}")
        seeds = min(a["rows"][method]["seeds"] for a in accuracy.values() if method in a["rows"])
        lines.append(f"| {_name(method, seeds)} | " + " | ".join(cells) + " |")
    notes = "; ".join(f"{t}: {_about(a)}" for t, a in accuracy.items())
    return lines + ["", f"{notes}.", ""]


def _about(acc: dict) -> str:
    return (f"n = {acc['n']} held-out examples, chance {100 * acc['chance']:.1f} %, one run's binomial SE "
            f"±{100 * report.binomial_se(acc['typical'], acc['n']):.1f} points (at the mean fine-tuned acc, "
            f"{100 * acc['typical']:.1f} %)")


def _delta(delta: tuple[float, float]) -> str:
    mean, se = delta
    return f"{100 * mean:+.1f} (SE {100 * se:.2f})"


def _versus(vs: dict | None) -> str:
    if vs is None:
        return "–"
    return _delta(vs["delta"]) + (f" [{vs['seeds']} shared seeds]" if vs["seeds"] > 1 else "")


def routing_table(task: str, methods: dict[str, list[dict]], seed: int | None = None) -> list[str]:
    """One seed's runs (every method has seed 0: the options are compared there), or all seeds of the
    methods that have several."""
    seeds_run = {m: len(rs) for m, rs in methods.items()}
    if seed is None:
        methods = {m: rs for m, rs in methods.items() if len(rs) > 1}
        which = "means over layers, then over seeds"
    else:
        methods = {m: [r for r in rs if r["seed"] == seed] for m, rs in methods.items()}
        which = f"seed {seed}, means over layers"
    methods = {m: rs for m, rs in methods.items() if rs}
    if not methods:
        return []
    # (a field no record has, such as the effective experts before they were counted, gets no column)
    fields = [f for f in ROUTING_FIELDS if any(report.routing_mean([r], "trained", f[0]) is not None
                                               for rs in methods.values() for r in rs)]
    config = next(iter(methods.values()))[0].get("config", {})
    experts, top_k = config.get("experts"), config.get("top_k")
    uniform = (f"; uniform routing puts 1/C({experts}, {top_k}) = {1 / math.comb(experts, top_k):.3f} of the tokens "
               "on any one top-K set" if experts and top_k else "")
    lines = [f"**{task}**, routing at injection → after training ({which}{uniform}):", "",
             "| method | " + ("" if seed is not None else "seeds | ")
             + " | ".join(label for _, label, _ in fields) + " |",
             "|---|" + "---:|" * (len(fields) + (seed is None))]
    for method, results in methods.items():
        if not all((r.get("routing") or {}).get("trained") for r in results):
            continue  # lora: no router
        cells = []
        for field, _, fmt in fields:
            before, after = (report.routing_mean(results, w, field) for w in ("injection", "trained"))
            cells.append("–" if before is None or after is None else f"{fmt.format(before)} → {fmt.format(after)}")
        count = "" if seed is not None else f"{len(results)} | "
        lines.append(f"| {_name(method, seeds_run[method])} | {count}" + " | ".join(cells) + " |")
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
    machines = sorted({r['machine'].get('cpu', '?') for m in runs.values() for rs in m.values() for r in rs})
    lines = ["# Routing study: tables", "",
             f"Generated by `python -m benchmarks.routing_study` from the `results.json` beside this file. "
             f"Machine(s): {', '.join(machines)}. acc: mean ± sample std over seeds; Δ: the mean paired difference of "
             "per-example correctness (same seed, same example), in points, with its standard error counting both the "
             "held-out examples and the training seeds (a two-level variance estimate: seeds × examples, crossed "
             f"random effects); {SINGLE_SEED}: a single seed, whose SE counts the examples only.", ""]
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
