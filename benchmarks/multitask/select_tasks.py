"""Choose the multi-task study's tasks from zero-shot and single-task evidence only, by a rule fixed
before any method is trained on the mixture.

    python -m benchmarks.multitask.select_tasks --output-dir outputs/multitask-study

The rule:
- SIQA and PIQA enter on single-task evidence: in the single-task routing study every method learned
  them, 2.3–3.0 paired standard errors above zero-shot (benchmarks/results/routing-study/summary.md).
- Each other candidate (BoolQ, ARC-E, Winogrande) is scored zero-shot on the study's held-out part
  (benchmarks/multitask/study.yaml: at most 500 examples). Its margin is (acc − floor) / SE, where the
  floor is the larger of the chance level (mean 1/choices) and the majority answer's share of the
  held-out part (BoolQ's "yes" is about 62 %: a model that always says yes is not reading), and SE the
  binomial standard error at the floor. A candidate enters when its margin is at least 2; of those, the
  two with the largest margins enter, so the mixture has four tasks (all three would add a fifth task's
  scoring to every run of the budget).
- If fewer than two candidates pass, the mixture is SIQA, PIQA and the passing one(s), and the report
  says so.
The zero-shot scores are the job's own (cached in the output folder, where the mixture's runs reuse
them). The decision is written to benchmarks/results/multitask-study/task-selection.json.
"""
from __future__ import annotations

import argparse
import collections
import math
import os

from gmoe.finetune import report
from gmoe.finetune.job import Job, JobConfig
from gmoe.finetune.options import read_yaml

STUDY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.yaml")
BY_SINGLE_TASK_EVIDENCE = ["siqa", "piqa"]
CANDIDATES = ["boolq", "arc-e", "winogrande"]
MIN_MARGIN = 2.0
CANDIDATES_TAKEN = 2
#: the methods compared on the mixture, 3 seeds each: LoRA at the experts' rank, LoRA as large as the mixture,
#: MixLoRA, the paper's GMoE and the graph router in which the token decides
STUDY_METHODS = ["lora", "lora-matched", "mixlora", "gmoe", "gmoe-token"]
OUT = os.path.join("benchmarks", "results", "multitask-study", "task-selection.json")


def zero_shot_margin(result: dict, examples) -> dict:
    """The candidate's zero-shot acc, its floor (chance or majority answer) and its margin in SEs."""
    chance = sum(1.0 / ex.num_choices for ex in examples) / len(examples)
    majority = max(collections.Counter(ex.gold for ex in examples).values()) / len(examples)
    floor = max(chance, majority)
    se = math.sqrt(floor * (1.0 - floor) / len(examples))
    return {"acc": result["acc"], "n": len(examples), "chance": chance, "majority_share": majority,
            "floor": floor, "se_at_floor": se, "margin_se": (result["acc"] - floor) / se}


def select(margins: dict[str, dict]) -> list[str]:
    """The rule above, on {candidate: zero_shot_margin(...)}: the study's tasks in the job's order."""
    passing = sorted((t for t, m in margins.items() if m["margin_se"] >= MIN_MARGIN),
                     key=lambda t: -margins[t]["margin_se"])
    return BY_SINGLE_TASK_EVIDENCE + passing[:CANDIDATES_TAKEN]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="outputs/multitask-study")
    p.add_argument("--json", default=OUT)
    args = p.parse_args(argv)
    budget = {k: v for k, v in read_yaml(STUDY, "study").items() if k != "seeds"}
    margins, zero = {}, {}
    for task in BY_SINGLE_TASK_EVIDENCE + CANDIDATES:
        cfg = JobConfig.from_fields({**budget, "task": task, "output_dir": args.output_dir})
        job = Job(cfg)
        zero[task] = job.zero_shot()
        if task in CANDIDATES:
            margins[task] = zero_shot_margin(zero[task], job.data.eval)
            m = margins[task]
            print(f"{task}: zero-shot acc {m['acc']:.3f} on n {m['n']}, floor {m['floor']:.3f} "
                  f"(chance {m['chance']:.3f}, majority {m['majority_share']:.3f}), margin {m['margin_se']:+.1f} SE")
    tasks = select(margins)
    print(f"the study's tasks: {', '.join(tasks)}")
    report.write_json(args.json, {"rule": __doc__, "margins": margins, "tasks": tasks,
                                  "zero_shot": {t: {k: z[k] for k in ("acc", "acc_norm", "n")} for t, z in zero.items()},
                                  "budget": budget, "machine": report.machine(), "versions": report.versions()})
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
