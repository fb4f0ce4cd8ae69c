"""Scoring a finished run again from its saved adapter (benchmarks/rescore_runs.py) gives what the job
recorded, rewrites only the evaluation and keeps what it replaced."""
import json

import pytest

from benchmarks.rescore_runs import main as rescore_main
from benchmarks.rescore_runs import rescore
from gmoe.finetune.cli import main
from tests.finetune_assets import TINY_RUN, tiny_job_files


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root, model, data = tiny_job_files(tmp_path_factory.mktemp("rescore"))
    out = root / "out"
    assert main(["run", "--model", model, "--task", "obqa", "--train-file", data, "--method", "gmoe",
                 "--output-dir", str(out), *TINY_RUN, "--lr", "0.05"]) == 0
    return out / "obqa" / "gmoe" / "seed0"


def test_rescoring_reproduces_the_jobs_own_evaluation_and_records_what_it_replaced(finished_run):
    path = finished_run / "results.json"
    recorded = json.loads(path.read_text())
    tampered = json.loads(path.read_text())
    tampered["finetuned"]["acc"] = -1.0
    tampered["finetuned"]["predictions"] = [0] * len(recorded["finetuned"]["predictions"])
    tampered["routing"]["trained"] = None
    path.write_text(json.dumps(tampered))
    rescore(str(finished_run), "a test", log=lambda *a: None)
    again = json.loads(path.read_text())
    # the job scored its in-memory model right after training (Trainer's fused AdamW: a stale router
    # cache there shows here), this scores the saved adapter on a fresh base
    assert again["finetuned"]["predictions"] == recorded["finetuned"]["predictions"]
    assert again["finetuned"]["acc"] == pytest.approx(recorded["finetuned"]["acc"])
    for field, value in recorded["routing"]["trained"]["summary"].items():
        assert again["routing"]["trained"]["summary"][field] == pytest.approx(value, rel=1e-6, abs=1e-9), field
    assert again["train"] == recorded["train"] and again["adapter_sha256"] == recorded["adapter_sha256"]
    (entry,) = again["rescored"]
    assert entry["reason"] == "a test" and entry["replaced"]["finetuned_acc"] == -1.0


def test_rescoring_refuses_an_adapter_that_is_not_the_recorded_one(finished_run, tmp_path):
    weights = next(p for p in (finished_run / "adapter").iterdir() if p.suffix == ".safetensors")
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(ValueError, match="sha256|digest|changed"):
            rescore(str(finished_run), "a test", log=lambda *a: None)
    finally:
        weights.write_bytes(original)


def test_a_folder_that_is_not_a_finished_run_is_one_line_and_status_2(tmp_path, capsys):
    assert rescore_main([str(tmp_path), "--reason", "a test"]) == 2
    assert "not a finished run" in capsys.readouterr().err
