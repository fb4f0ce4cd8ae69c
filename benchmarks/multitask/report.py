"""The multi-task study's tables, read from the records of its runs.

    python -m benchmarks.multitask.report [--root benchmarks/results/multitask-study] [--references lora,lora-matched] [--docs docs/routing.md]

Reads every <job>/<method>/seed<S>/results.json under --root (the job's records, copied there by
benchmarks/collect_runs.sh) and writes <root>/summary.md:
- accuracy, per task and the macro mean over tasks: per method the acc (mean ± sample std over seeds) and
  the paired difference to each baseline of --references listed before it (`lora`; `lora-matched` too for
  the mixtures), on the seeds both have, with a standard error that counts the training seeds as well as
  the held-out examples (benchmarks/routing_study.two_level_se; the macro difference weighs each task's
  examples by 1/(tasks × its n), so every task counts the same), beside each task's chance level and the
  zero-shot score; and the smallest difference the study could have detected, 2.8 SE (a two-sided 5 %
  test with 80 % power);
- routing, per method (mean over seeds) at injection → after training: the busiest expert's share of the
  slots (uniform routing: 1/E), the fraction of tokens on the layer's most common top-K set (uniform:
  1/C(E, K)), the effective number of experts per token (K when the top-K weights are equal), and how much
  the expert a token takes tells about its task: the mutual information between task and expert slot per
  layer, normalised by the task entropy, mean over layers (0: every task spreads over the experts alike;
  1: the expert names the task). Each task's routing is measured on its own held-out examples;
  <job>/routing-by-task.png draws that information layer by layer.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics

from benchmarks.routing_study import held_out, load_runs, per_run, two_level_se
from benchmarks.multitask.select_tasks import STUDY_METHODS
from gmoe.finetune import report

ROOT = os.path.join("benchmarks", "results", "multitask-study")
DETECTABLE = 2.8  # z(0.975) + z(0.8): the difference a two-sided 5 % test finds 80 % of the time, in SEs


def task_expert_information(per_task: dict[str, dict]) -> float | None:
    """Mean over layers of I(task; expert slot) / H(task), from each task's routing record (its layers'
    slot shares and its token count); None without per-task records or with one task."""
    values = task_expert_information_by_layer(per_task)
    return None if values is None else statistics.fmean(values)


def task_expert_information_by_layer(per_task: dict[str, dict]) -> list[float] | None:
    """I(task; expert slot) / H(task) of every layer (see `task_expert_information`)."""
    tasks = [t for t, r in per_task.items() if r and r.get("tokens")]
    if len(tasks) < 2:
        return None
    total = sum(per_task[t]["tokens"] for t in tasks)
    weight = {t: per_task[t]["tokens"] / total for t in tasks}
    entropy = -sum(w * math.log(w) for w in weight.values())
    layers = len(per_task[tasks[0]]["layers"])
    values = []
    for layer in range(layers):
        shares = {t: per_task[t]["layers"][layer]["slot_share"] for t in tasks}
        marginal = [sum(weight[t] * shares[t][e] for t in tasks) for e in range(len(shares[tasks[0]]))]
        info = sum(weight[t] * s * math.log(s / marginal[e])
                   for t in tasks for e, s in enumerate(shares[t]) if s > 0)
        values.append(info / entropy)
    return values


def routing_figure(job: str, methods: dict[str, list[dict]], path: str) -> str | None:
    """`path`: the task–expert information of every layer, per method (mean over seeds), at injection
    (dashed) and after training (solid): where in the model, if anywhere, tasks take different experts."""
    curves = {}
    for method, results in methods.items():
        for when in ("injection", "trained"):
            runs = [task_expert_information_by_layer({t: r[when] for t, r in res["routing"].get("tasks", {}).items()})
                    for res in results]
            if runs and None not in runs:
                curves[method, when] = [statistics.fmean(layer) for layer in zip(*runs)]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = {}
    for (method, when), values in curves.items():
        color = colors.setdefault(method, f"C{len(colors)}")
        seeds = len(methods[method])
        ax.plot(range(len(values)), values, color=color, ls="-" if when == "trained" else "--",
                label=f"{method} ({seeds} seed{'s' if seeds > 1 else ''})" if when == "trained" else None)
    ax.set_xlabel("layer")
    ax.set_ylabel("I(task; expert) / H(task)")
    ax.set_title(f"{job}: how much a token's expert tells about its task (dashed: at injection)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def macro_correct(results: list[dict], golds: dict[str, list[int]], part: str = "finetuned") -> list[list[float]]:
    """Per run, per held-out example of every task (tasks in order): correct (1/0) scaled by
    N / (tasks × n_task), so that the mean over all N examples is the macro accuracy."""
    total = sum(len(g) for g in golds.values())
    rows = []
    for r in results:
        row = []
        for task, g in golds.items():
            scale = total / (len(golds) * len(g))
            row += [scale * c for c in per_run([r[part]["tasks"][task]["predictions"]], g)[0]]
        rows.append(row)
    return rows


def difference(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """Mean of a − b over seeds and examples and its two-level standard error."""
    d = [[x - y for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)]
    return statistics.fmean(x for row in d for x in row), two_level_se(d)[0]


def accuracy(methods: dict[str, list[dict]], golds: dict[str, list[int]], references: list[str]) -> dict:
    """Per method: per task and macro acc (mean, std over seeds) and, under `versus`, the paired
    difference to every reference listed before the method itself (a baseline is not compared with the
    baselines after it), on the seeds both have."""
    rows = {}
    for method, results in methods.items():
        row = {"seeds": len(results), "macro": report.mean_std([r["finetuned"]["acc"] for r in results]),
               "tasks": {t: report.mean_std([r["finetuned"]["tasks"][t]["acc"] for r in results]) for t in golds},
               "versus": {}}
        for reference in references[:references.index(method)] if method in references else references:
            ref = {r["seed"]: r for r in methods.get(reference, [])}
            shared = [r for r in results if r["seed"] in ref]
            if not shared:
                continue
            theirs = [ref[r["seed"]] for r in shared]
            row["versus"][reference] = {
                "seeds": len(shared),
                "macro": difference(macro_correct(shared, golds), macro_correct(theirs, golds)),
                "tasks": {t: difference(per_run([r["finetuned"]["tasks"][t]["predictions"] for r in shared], g),
                                        per_run([r["finetuned"]["tasks"][t]["predictions"] for r in theirs], g))
                          for t, g in golds.items()}}
        rows[method] = row
    return rows


def _pct(pair) -> str:
    mean, std = pair
    return report.percent_pm(mean, std)


def _delta(pair) -> str:
    mean, se = pair
    return f"{100 * mean:+.1f} (SE {100 * se:.1f})"


def accuracy_table(job: str, rows: dict, golds: dict, chance: dict, zero: dict, references: list[str]) -> list[str]:
    tasks = list(golds)
    head = "| method | seeds | " + " | ".join(f"{t} (n {len(golds[t])}, chance {100 * chance[t]:.0f} %)" for t in tasks)
    lines = [f"### {job}: accuracy (%), mean ± std over seeds; Δ vs a baseline in points (SE over seeds and examples)",
             "", head + " | macro |", "|---|---:|" + "---:|" * (len(tasks) + 1),
             "| zero-shot | – | " + " | ".join(f"{100 * zero['tasks'][t]['acc']:.1f}" for t in tasks)
             + f" | {100 * zero['acc']:.1f} |"]
    ses: dict[str, list[float]] = {}
    for method, row in rows.items():
        cells = [_pct(row["tasks"][t]) for t in tasks] + [_pct(row["macro"])]
        lines.append(f"| `{method}` | {row['seeds']} | " + " | ".join(cells) + " |")
        for reference, vs in row["versus"].items():
            lines.append(f"| Δ vs `{reference}` | {vs['seeds']} | "
                         + " | ".join(_delta(vs["tasks"][t]) for t in tasks) + f" | {_delta(vs['macro'])} |")
            ses.setdefault(reference, []).append(vs["macro"][1])
    lines += ["", f"Macro chance {100 * statistics.fmean(chance.values()):.1f} %."]
    for reference, values in ses.items():
        lines.append(f"Smallest macro difference to `{reference}` this study could detect (2.8 SE, 5 % two-sided, "
                     f"80 % power): {100 * DETECTABLE * max(values):.1f} points at the largest SE, "
                     f"{100 * DETECTABLE * min(values):.1f} at the smallest.")
    return lines + [""]


ROUTING = (("busiest_share", "busiest expert", lambda e, k: 1 / e),
           ("top_set_fraction", "top-K set", lambda e, k: 1 / math.comb(e, k)),
           ("effective_experts", "effective experts", lambda e, k: float(k)))


def routing_table(job: str, methods: dict[str, list[dict]]) -> list[str]:
    moe = {m: rs for m, rs in methods.items() if rs[0]["routing"].get("injection")}
    if not moe:
        return []
    first = next(iter(moe.values()))[0]["routing"]["injection"]
    e, k = first["num_experts"], first["top_k"]
    head = " | ".join(f"{name} (uniform {ref(e, k):.3f})" for _, name, ref in ROUTING)
    lines = [f"### {job}: routing at injection → after training (means over layers and seeds)", "",
             f"| method | {head} | task–expert information |", "|---|" + "---:|" * (len(ROUTING) + 1)]
    for method, results in moe.items():
        cells = []
        for field, _, _ in ROUTING:
            values = [report.routing_mean(results, when, field) for when in ("injection", "trained")]
            cells.append(" → ".join("–" if v is None else f"{v:.2f}" for v in values))
        info = []
        for when in ("injection", "trained"):
            per_run_info = [task_expert_information({t: r[when] for t, r in res["routing"].get("tasks", {}).items()})
                            for res in results]
            info.append("–" if None in per_run_info else f"{statistics.fmean(per_run_info):.3f}")
        lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {' → '.join(info)} |")
    return lines + ["", "Task–expert information: I(task; expert slot) / H(task) per layer, mean over layers, each "
                    "task measured on its own held-out examples (0: the tasks spread over the experts alike).", ""]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=ROOT)
    p.add_argument("--docs", help="also put the tables into this Markdown page, between its marker lines")
    p.add_argument("--references", default="lora,lora-matched",
                   help="the baselines, comma-separated: each method is compared with those listed before it")
    args = p.parse_args(argv)
    references = args.references.split(",")
    unknown = [r for r in references if r not in STUDY_METHODS]
    if unknown:
        p.error(f"--references: {', '.join(unknown)} is not a method of the study ({', '.join(STUDY_METHODS)})")
    # a page without its markers is refused before any work, not after it
    page = docs_page(args.docs) if args.docs else None
    header = ["# The multi-task study", "", "Generated by `python -m benchmarks.multitask.report` from the records "
              "below this folder; do not edit by hand.", ""]
    lines = []
    for job, methods in sorted(load_runs(args.root).items()):
        order = {m: i for i, m in enumerate(STUDY_METHODS)}
        methods = dict(sorted(methods.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
        first = next(iter(methods.values()))[0]
        examples = held_out(methods)  # also checks that every run recorded the same split
        from gmoe.finetune.data import prepare_data
        from gmoe.finetune.job import JobConfig

        data = prepare_data(JobConfig.from_fields(first["config"]))
        assert len(examples) == len(data.eval)
        golds = {t: [ex.gold for ex in d.eval] for t, d in data.tasks.items()}
        chance = {t: statistics.fmean(1.0 / ex.num_choices for ex in d.eval) for t, d in data.tasks.items()}
        rows = accuracy(methods, golds, references)
        lines += accuracy_table(job, rows, golds, chance, first["zero_shot"], references)
        lines += routing_table(job, methods)
        figure = routing_figure(job, {m: rs for m, rs in methods.items() if rs[0]["routing"].get("tasks")},
                                os.path.join(args.root, job, "routing-by-task.png"))
        if figure:
            lines += [f"![task–expert information per layer]({job}/routing-by-task.png)", ""]
    text = "\n".join(header + lines) + "\n"
    report.write_text(os.path.join(args.root, "summary.md"), text)
    if page:
        embed_in_docs(args.docs, page, lines, args.root)
    print(text)
    return text


DOCS_START = "<!-- multi-task tables: python -m benchmarks.multitask.report --docs docs/routing.md -->"
DOCS_END = "<!-- end of the multi-task tables -->"


def docs_page(path: str) -> tuple[str, str]:
    """(the page before its start marker, the page from its end marker on) of the Markdown page `path`;
    a missing page or markers end the program with one line."""
    try:
        with open(path, encoding="utf-8") as f:
            page = f.read()
    except OSError as err:
        raise SystemExit(f"--docs: cannot read {path}: {err.strerror}") from None
    if page.count(DOCS_START) != 1 or page.count(DOCS_END) != 1 or page.index(DOCS_START) > page.index(DOCS_END):
        raise SystemExit(f"{path}: needs the line {DOCS_START!r} once, followed by {DOCS_END!r} once")
    return page.split(DOCS_START)[0], page.split(DOCS_END)[1]


def embed_in_docs(path: str, page: tuple[str, str], lines: list[str], root: str) -> None:
    """Write the page `path` (`docs_page`'s parts) with the tables between its two markers: a job's
    table titles become bold lines and the figures' links are made relative to the page."""
    to_root = os.path.relpath(root, os.path.dirname(path) or ".")
    body = []
    for line in lines:
        if line.startswith("### "):
            title, _, rest = line[4:].partition(" (")
            line = f"**{title}**" + (f" ({rest}" if rest else "")
        elif line.startswith("![") and "](" in line:
            label, _, target = line.partition("](")
            line = f"{label}]({to_root}/{target}"
        body.append(line)
    head, tail = page
    report.write_text(path, head + DOCS_START + "\n" + "\n".join(body).rstrip() + "\n" + DOCS_END + tail)


if __name__ == "__main__":
    main()
