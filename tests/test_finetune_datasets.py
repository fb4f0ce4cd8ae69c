"""--dataset: a local save_to_disk folder (DatasetDict with or without a train split, or one split) and a
hub id (datasets.load_dataset mocked: no hub here); every result says which case it was; docs/finetune.md
table names the datasets lm-evaluation-harness uses."""
import json
from pathlib import Path

import datasets
import pytest

from tests.finetune_assets import task_rows, tiny_model_folder
from gmoe.finetune.cli import main, parse_command
from gmoe.finetune.job import prepare_data
from gmoe.finetune.sources import HARNESS_DATASETS

TINY = ["--max-steps", "2", "--batch-size", "4", "--eval-batch-size", "8", "--r", "2", "--alpha", "4",
        "--experts", "4", "--top-k", "2", "--log-steps", "1", "--max-length", "64"]


def _dict_folder(path, **splits):
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return str(path)


def test_a_datasetdict_with_a_train_split_trains_on_it_and_scores_the_eval_split(tmp_path):
    folder = _dict_folder(tmp_path / "d", train=task_rows("obqa", 12), validation=task_rows("obqa", 6),
                          test=task_rows("obqa", 3))
    data = prepare_data(parse_command("run", ["--task", "obqa", "--dataset", folder]))
    assert (len(data.train), len(data.eval)) == (12, 6)
    assert data.split["case"] == "given splits" and data.split["kind"] == "local DatasetDict"
    test = prepare_data(parse_command("run", ["--task", "obqa", "--dataset", folder, "--eval-split", "test"]))
    assert len(test.eval) == 3 and test.split["eval_split"] == "test"


def test_without_a_train_split_the_validation_set_is_cut_in_two(tmp_path):
    only_val = _dict_folder(tmp_path / "v", validation=task_rows("piqa", 10))
    data = prepare_data(parse_command("run", ["--task", "piqa", "--dataset", only_val]))
    assert data.split["case"] == "cut validation" and (len(data.train), len(data.eval)) == (5, 5)
    datasets.Dataset.from_list(task_rows("piqa", 8)).save_to_disk(str(tmp_path / "one"))
    one = prepare_data(parse_command("run", ["--task", "piqa", "--dataset", str(tmp_path / "one")]))
    assert one.split["case"] == "cut validation" and one.split["kind"] == "local single split"
    packaged_like = prepare_data(parse_command("run", ["--task", "piqa", "--train-file", _jsonl(tmp_path)]))
    assert packaged_like.split["case"] == "cut validation"
    with pytest.raises(ValueError, match="has no split 'dev'"):
        prepare_data(parse_command("run", ["--task", "piqa", "--dataset", only_val, "--eval-split", "dev"]))


def _jsonl(tmp_path):
    from tests.finetune_assets import write_jsonl

    return write_jsonl(tmp_path / "piqa.jsonl", task_rows("piqa", 8))


def test_a_hub_dataset_goes_through_load_dataset_with_its_config_and_splits(monkeypatch):
    calls = []
    boolq = [{"question": "is it", "passage": "It is.", "idx": i, "label": i % 2} for i in range(6)]

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(boolq[:4] if split == "train" else boolq[4:])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = prepare_data(parse_command("run", ["--task", "boolq", "--dataset", "aps/super_glue",
                                              "--dataset-config", "boolq"]))
    assert calls == [("aps/super_glue", "boolq", "validation"), ("aps/super_glue", "boolq", "train")]
    assert data.split["case"] == "given splits" and data.split["kind"] == "hub"
    assert [ex.gold for ex in data.train] == [0, 1, 0, 1]  # super_glue's label 0/1 = no/yes


def test_a_hub_dataset_without_a_train_split_is_cut(monkeypatch):
    def load_dataset(name, config=None, split=None):
        if split == "train":
            raise ValueError('Unknown split "train". Should be one of [\'validation\'].')
        return datasets.Dataset.from_list(task_rows("winogrande", 6))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = prepare_data(parse_command("run", ["--task", "winogrande", "--dataset", "allenai/winogrande",
                                              "--dataset-config", "winogrande_xl"]))
    assert data.split["case"] == "cut validation" and len(data.train) + len(data.eval) == 6


def test_a_run_on_a_local_datasetdict_records_the_case_and_the_budget_names_it(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "tiny")
    folder = _dict_folder(tmp_path / "d", train=task_rows("obqa", 8), validation=task_rows("obqa", 4))
    out = tmp_path / "runs"
    assert main(["run", "--model", model, "--task", "obqa", "--dataset", folder, "--method", "lora",
                 "--output-dir", str(out), *TINY]) == 0
    res = json.loads((out / "obqa" / "lora" / "seed0" / "results.json").read_text())
    assert res["split"]["case"] == "given splits" and res["split"]["train_used"] == 8
    assert res["budget"]["dataset"] == folder and res["budget"]["eval_split"] == "validation"
    assert main(["run", "--model", model, "--task", "obqa", "--dataset", folder, "--train-file", folder,
                 "--output-dir", str(out)]) == 2
    assert "--dataset excludes --train-file" in capsys.readouterr().err


def test_the_docs_name_the_harness_datasets():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "finetune.md").read_text()
    for task, (path, config) in HARNESS_DATASETS.items():
        assert f"| {task} | `{path}` | {f'`{config}`' if config else '–'} |" in readme


def test_one_split_for_training_and_scoring_is_refused_before_loading(tmp_path, capsys):
    argv = ["run", "--task", "obqa", "--dataset", str(tmp_path), "--train-split", "validation",
            "--eval-split", "validation", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "both 'validation'" in capsys.readouterr().err
