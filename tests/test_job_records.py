"""What a finished run of the job leaves: the budget line names what set the budget, the logs lead with the
task loss, and no empty or leftover folders stay beside the record."""
import json
import os

from gmoe.finetune.cli import main
from tests.finetune_assets import TINY_RUN, tiny_job_files


def test_a_run_records_its_budget_and_leaves_only_its_files(tmp_path):
    root, model, data = tiny_job_files(tmp_path)
    out = root / "out"
    assert main(["run", "--model", model, "--task", "obqa", "--train-file", data, "--method", "gmoe",
                 "--save-steps", "1", "--output-dir", str(out), *TINY_RUN]) == 0
    table = (out / "obqa" / "summary-gmoe.md").read_text()
    assert "budget: 2 optimizer step(s) (--max-steps; --epochs 2 unused)" in table and "2 epoch(s)" not in table
    run = out / "obqa" / "gmoe" / "seed0"
    assert sorted(os.listdir(run)) == ["adapter", "loss.png", "results.json", "routing.png"]  # no trainer/
    assert sorted(os.listdir(run.parent)) == [".seed0.lock", "seed0"]  # checkpoints gone once finished
    logs = [r for r in json.loads((run / "results.json").read_text())["train"]["log_history"] if "task_loss" in r]
    assert logs and all(list(r)[:2] == ["task_loss", "router_loss"] for r in logs)
