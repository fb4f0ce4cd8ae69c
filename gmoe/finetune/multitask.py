"""Several tasks in one job: `--task arc-c,boolq` or the group `commonsense` trains one adapter on the
shuffled mixture of the tasks' training parts and scores each task's held-out part on its own; the
job's accuracy is the macro average (the mean over tasks, each task weighing the same).

Names: the tasks are put in the order of `TASKS` (so `obqa,arc-e` and `arc-e,obqa` are the same job),
and the job is called by its tasks joined with `+` (`arc-e+obqa`), or `commonsense` for all eight. That
name is the job's output folder under `--output-dir`, its result's `task` and its budget's `task`.
"""
from __future__ import annotations

import math
import statistics

from .tasks import TASKS

#: named groups of tasks
TASK_GROUPS = {"commonsense": ["arc-c", "arc-e", "boolq", "obqa", "siqa", "piqa", "hellaswag", "winogrande"]}


def task_names(spec: str) -> list[str]:
    """The tasks of a --task value (one name, a comma list, a group, or a mix), in `TASKS` order, each once."""
    names = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        for name in TASK_GROUPS.get(part, [part]):
            if name not in TASKS:
                raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASKS)} (or a comma list of them, "
                                 f"or the group {', '.join(TASK_GROUPS)})")
            names.append(name)
    if not names:
        raise ValueError(f"--task {spec!r} names no task")
    return [t for t in TASKS if t in names]


def is_multi(spec: str) -> bool:
    return len(task_names(spec)) > 1


def job_name(spec: str) -> str:
    """The folder and result name of a --task value: the task itself, a group's name, or `a+b+c`."""
    names = task_names(spec)
    if len(names) == 1:
        return names[0]
    for group, members in TASK_GROUPS.items():
        if names == [t for t in TASKS if t in members]:
            return group
    return "+".join(names)


def interleave(parts: list[list]) -> list:
    """Round-robin over the lists (a[0], b[0], a[1], b[1], ...): every task among the first examples."""
    out = []
    for i in range(max((len(p) for p in parts), default=0)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def macro(per_task: dict[str, dict]) -> dict:
    """One score from each task's `evaluate` result: acc and acc_norm as the mean over tasks, counts summed,
    and each task's own numbers under `tasks`."""
    tasks = {t: {k: v for k, v in r.items() if k not in ("loglikelihoods", "predictions_norm")}
             for t, r in per_task.items()}
    seconds = sum(r["seconds"] for r in tasks.values())
    tokens = sum(r["tokens"] for r in tasks.values())
    return {"acc": statistics.fmean(r["acc"] for r in tasks.values()),
            "acc_norm": statistics.fmean(r["acc_norm"] for r in tasks.values()),
            "average": "macro (mean over tasks)", "n": sum(r["n"] for r in tasks.values()),
            "requests": sum(r["requests"] for r in tasks.values()), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else None, "tasks": tasks}


def macro_se(accs: dict[str, float], ns: dict[str, int]) -> float | None:
    """The standard error of a mean over tasks of independent binomial accuracies: sqrt(Σ p(1 − p)/n) / T."""
    if not accs or any(ns.get(t, 0) <= 0 for t in accs):
        return None
    return math.sqrt(sum(p * (1.0 - p) / ns[t] for t, p in accs.items())) / len(accs)
