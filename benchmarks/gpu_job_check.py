"""The fine-tuning job on one GPU for 2 steps: device placement (this rank's own cuda:LOCAL_RANK) and the
bf16 path (--dtype auto picks bfloat16 where the GPU has it), end to end on the tiny model.

    python benchmarks/gpu_job_check.py OUT_DIR      (benchmarks/gpu_check.sh runs it)

Writes OUT_DIR/job_check.json and exits non-zero when the run fails or did not use the GPU."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmoe.finetune.cli import main as finetune  # noqa: E402
from tests.finetune_assets import TINY_RUN, tiny_job_files  # noqa: E402


def main(out: str) -> int:
    root = Path(out) / "job_check"
    root.mkdir(parents=True, exist_ok=True)
    _, model, data = tiny_job_files(root)
    status = finetune(["run", "--model", model, "--task", "obqa", "--train-file", data, "--method", "gmoe",
                       "--dtype", "auto", "--save-steps", "1", "--output-dir", str(root / "out"), *TINY_RUN])
    record = json.loads((root / "out" / "obqa" / "gmoe" / "seed0" / "results.json").read_text()) if status == 0 else {}
    summary = {"status": status, "cuda": torch.cuda.is_available(),
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "precision": record.get("precision"), "distributed": record.get("distributed"),
               "steps": record.get("train", {}).get("steps"), "peak_memory": record.get("peak_memory"),
               "acc": record.get("finetuned", {}).get("acc")}
    with open(os.path.join(out, "job_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    used_gpu = (summary["peak_memory"] or {}).get("kind") == "cuda_max_memory_allocated"
    return 0 if status == 0 and used_gpu else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
