"""A job's several methods and seeds: run every asked (method, seed) not done yet, then rebuild the summary
(table, JSON, bar chart) from the records on disk. Rank 0 writes it; every rank returns it."""
from __future__ import annotations

import os

from . import distributed, plots, report, runlock
from .job import JobConfig, run_dir, task_dir
from .multitask import job_name


def compare(job) -> dict:
    """Run every asked (method, seed) not done yet, then rebuild the summary from what is on disk.

    The summary is written by rank 0 under a lock (`.summary.lock` in the task folder) and read from disk
    inside it, so of two jobs sharing an output folder the one that writes last lists every run finished
    by then. Runs another live process holds are skipped and returned in "busy"; asked runs with no
    finished result are listed in "missing" (the table says so)."""
    busy = []
    # seed-major order: a table stopped half-way has every method at its first seeds
    for s in job.cfg.seeds:
        for m in job.cfg.methods:
            try:
                job.run(m, s)
            except runlock.RunBusy as err:
                job.log(f"{m} seed {s}: skipped: {err}")
                busy.append({"method": m, "seed": s, "reason": str(err)})
    zero = job.zero_shot()  # every rank: it may need scoring (a collective) when every run was skipped
    summary = distributed.broadcast(job.ranks, distributed.agree(job.ranks, "writing the summary",
                                                                  _summary, job, zero))
    summary["busy"] = busy
    return summary


def _summary(job, zero: dict) -> dict | None:
    if not job.ranks.is_main:
        return None
    with runlock.claim(os.path.join(task_dir(job.cfg), "summary"), wait=True):
        results, missing = finished_results(job)
        summary = write_summary(job, results, missing, zero)
    summary["runs"] = [{"method": m, "seed": r["seed"], "files": [
        os.path.join(run_dir(job.cfg, m, r["seed"]), "results.json"), *r.get("plots", {}).values()]}
        for m, rs in results.items() for r in rs]
    return summary


def finished_results(job) -> tuple[dict, list]:
    """{method: [results of its finished seeds]} of the asked methods and seeds, and the
    (method, seed) pairs asked for that have no finished result."""
    results, missing = {}, []
    for m in job.cfg.methods:
        for s in job.cfg.seeds:
            done = job.finished(m, s)
            if done is None:
                missing.append((m, s))
            else:
                results.setdefault(m, []).append(done)
    return results, missing


def write_summary(job, results: dict, missing: list = (), zero: dict | None = None) -> dict:
    cfg = job.cfg
    zero = zero if zero is not None else job.zero_shot()
    parts = job.data.parts()
    chance = sum(sum(1.0 / ex.num_choices for ex in ex_) / len(ex_) for ex_ in parts.values()) / len(parts)
    summary = report.summarize(job_name(cfg.task), zero, results, chance=chance)
    summary["split"] = job.data.split
    summary["budget"] = cfg.training_budget()
    summary["preset"] = cfg.preset
    summary["machine"], summary["versions"] = report.machine(), report.versions()
    name = "compare" if len(cfg.methods) > 1 else f"summary-{cfg.methods[0]}"
    base = os.path.join(task_dir(cfg), name)
    s = job.data.split
    header = (f"**{job_name(cfg.task)}** ({cfg.model}): train {s['train_used']} / held-out eval {s['eval_used']} examples "
              f"of {s['source']} (split seed {s['split_seed']}); budget: {_budget_words(cfg)}, lr {cfg.lr:g}, "
              f"batch {cfg.batch_size}×{cfg.grad_accum}, warmup {cfg.warmup_ratio:g}, r {cfg.r}, alpha {cfg.alpha:g}, "
              f"E {cfg.experts}, K {cfg.top_k}; seeds {cfg.seeds}")
    if job.data.tasks:
        header += (f"; tasks {', '.join(job.data.tasks)} trained together (mixture shuffled with seed "
                   f"{s['mix_seed']}), acc the mean over tasks; counts per task as listed below")
    summary["markdown"] = report.markdown_table(summary, header)
    summary["missing"] = [{"method": m, "seed": s} for m, s in missing]
    if missing:
        summary["markdown"] += f"\nPARTIAL: no finished result yet for {_pairs(missing)}.\n"
    report.write_text(base + ".md", summary["markdown"])
    summary["plot"] = plots.comparison_bars(summary["rows"], base + ".png",
                                            f"{job_name(cfg.task)}: acc, mean ± std over seeds")
    report.write_json(base + ".json", summary)
    summary["paths"] = {"markdown": base + ".md", "json": base + ".json", "plot": summary["plot"]}
    return summary


def _budget_words(cfg: JobConfig) -> str:
    """What set the training budget: --max-steps when given (it overrides --epochs), else the epochs."""
    if cfg.max_steps > 0:
        return f"{cfg.max_steps} optimizer step(s) (--max-steps; --epochs {cfg.epochs:g} unused)"
    return f"{cfg.epochs:g} epoch(s)"


def _pairs(pairs) -> str:
    return ", ".join(f"{m} seed {s}" for m, s in pairs)
