"""Score finished job runs again from their saved adapters, with this version of the scorer and router.

    python -m benchmarks.rescore_runs --reason "why" RUN [RUN ...]

A run is a job's <method>/seed<S> folder: its results.json and its adapter/. The adapter's files are
checked against the sha256 the record holds, loaded onto the base model the record names, and scored
on the same held-out examples; the routing after training is measured again as the job measures it
(for a mixture, each task's too). results.json is rewritten atomically with the new "finetuned" and
"routing" → "trained" values and a "rescored" entry (reason, date, versions, and the values it
replaced), so the record still describes exactly the files beside it. The training itself (loss
history, routing history, plots, the adapter) is not touched: this is for an evaluation-side fix.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

from gmoe.finetune import methods as M
from gmoe.finetune import report, runfiles
from gmoe.finetune.job import Job, JobConfig
from gmoe.finetune.trainrun import held_out_routing


def rescore(run: str, reason: str, log=print) -> dict:
    path = os.path.join(run, "results.json")
    adapter = os.path.join(run, "adapter")
    if not os.path.isfile(path) or not os.path.isdir(adapter):
        raise ValueError(f"{run}: not a finished run (needs its results.json and adapter/)")
    result = report.read_json(path)
    if "adapter_sha256" not in result:
        raise ValueError(f"{path} records no adapter_sha256, so its adapter cannot be checked")
    runfiles.check_adapter_digest(adapter, result["adapter_sha256"], path)
    replaced = {"finetuned_acc": result["finetuned"]["acc"],
                "routing_trained_summary": (result["routing"]["trained"] or {}).get("summary")}
    job = Job(JobConfig.from_fields(result["config"]), log=log)
    base, tok = job.base()
    model = M.load_adapter(base, adapter)  # (the job, and so its base model, serves this run only)
    result["finetuned"] = job.score(model, tok)
    routing = held_out_routing(job, model, tok)
    if routing["all"] is not None:
        result["routing"]["trained"] = routing["all"]
        for task, stages in result["routing"].get("tasks", {}).items():
            stages["trained"] = routing["tasks"][task]
    result.setdefault("rescored", []).append({
        "reason": reason, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": report.versions(), "replaced": replaced})
    report.write_json(path, result)
    log(f"{run}: acc {replaced['finetuned_acc']:.4f} -> {result['finetuned']['acc']:.4f}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="<method>/seed<S> folders of finished runs")
    p.add_argument("--reason", required=True, help="what changed in the evaluation, recorded in each results.json")
    args = p.parse_args(argv)
    for run in args.runs:
        try:
            rescore(run, args.reason)
        except (ValueError, OSError) as err:
            print(f"rescore_runs: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
