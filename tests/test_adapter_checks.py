"""A saved adapter is checked whole (config, digest, tensors against the base model's shapes) before
any model loads or any scoring runs; an adapter config without a known peft_type is a clear error; a
base model with an adapter merged in is marked and refuses a GMoE adapter; `eval` and `routing`
print the adapter's recorded run, take its task by default and note the fields that differ."""
import json
import shutil

import pytest
import torch

from gmoe.finetune.cli import main, parse_command
from tests.finetune_assets import tiny_job_files

SPEC = dict(r=2, alpha=4, dropout=0.0, experts=4, top_k=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, tiny model folder, OBQA JSONL, a GMoE run folder with results.json, a LoRA adapter)."""
    from gmoe.finetune.assets import load_base_model
    from gmoe.finetune.methods import AdapterSpec, apply_method
    from gmoe.finetune.runfiles import adapter_digest

    root, model, data = tiny_job_files(tmp_path_factory.mktemp("adapters"))
    base, _ = load_base_model(model)
    torch.manual_seed(0)
    run = root / "obqa" / "gmoe" / "seed0"
    apply_method(base, "gmoe", AdapterSpec(**SPEC)).save_pretrained(run / "adapter")
    record = {"task": "obqa", "method": "gmoe", "seed": 0, "model": model,
              "budget": {"model": model, "task": "obqa", "epochs": 2.0, "max_steps": -1, "lr": 5e-4},
              "config": {"model": model, "task": "obqa", "max_length": 64, "split_seed": 1234},
              "adapter_config": {}, "adapter_sha256": adapter_digest(run / "adapter")}
    (run / "results.json").write_text(json.dumps(record))
    base, _ = load_base_model(model)
    apply_method(base, "lora", AdapterSpec(**SPEC)).save_pretrained(root / "lora")
    return root, model, data, run, root / "lora"


@pytest.fixture
def nothing_loads(monkeypatch):
    """A model load fails the test: the adapter must be checked first."""
    def loaded(*args, **kwargs):
        raise AssertionError("loaded the model before checking the adapter")

    monkeypatch.setattr("gmoe.finetune.assets.load_base_model", loaded)


def _copy(folder, to):
    shutil.copytree(folder, to)
    return to


def _eval(setup, adapter, *extra):
    root, model, data, _, _ = setup
    return main(["eval", "--model", model, "--task", "obqa", "--train-file", data, "--output-dir",
                 str(root / "eval-out"), "--adapter", str(adapter), *extra])


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_truncated_weights_file_is_refused_before_the_model_loads(setup, tmp_path, capsys, nothing_loads):
    adapter = _copy(setup[3] / "adapter", tmp_path / "a")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert _eval(setup, adapter) == 2
    assert f"{weights} is corrupt or not a safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("kind,changes", [("gmoe", {"num_experts": 2}), ("gmoe", {"r": 3}), ("lora", {"r": 4})])
def test_a_config_that_does_not_fit_its_tensors_is_refused_before_the_model_loads(setup, tmp_path, capsys,
                                                                                  nothing_loads, kind, changes):
    adapter = _copy(setup[3] / "adapter" if kind == "gmoe" else setup[4], tmp_path / "a")
    _edit_config(adapter, **changes)
    assert _eval(setup, adapter) == 2
    err = capsys.readouterr().err
    assert f"--adapter {adapter} does not fit this base model and its adapter_config.json" in err, err
    assert "shape" in err or "missing keys" in err


def test_an_adapter_changed_after_its_run_is_refused_before_the_model_loads(setup, tmp_path, capsys, nothing_loads):
    run = _copy(setup[3], tmp_path / "run")
    _edit_config(run / "adapter", lora_dropout=0.25)  # a valid value, but not what the run recorded
    assert _eval(setup, run / "adapter") == 2
    err = capsys.readouterr().err
    assert "adapter_config.json differ from the sha256 that" in err and "results.json recorded" in err


@pytest.mark.parametrize("text,message", [
    ("{}", "has no peft_type, so it is not the config of an adapter folder written by save_pretrained"),
    ('{"peft_type": "PREFIX_TUNING"}', "has peft_type 'PREFIX_TUNING': only GMoE (\"GMOE\") and PEFT LoRA"),
])
def test_an_adapter_config_without_a_known_peft_type_is_a_clear_error(setup, tmp_path, capsys, nothing_loads, text,
                                                                       message):
    from gmoe.finetune.methods import load_adapter

    adapter = _copy(setup[3] / "adapter", tmp_path / "a")
    (adapter / "adapter_config.json").write_text(text)
    assert _eval(setup, adapter) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="peft_type"):
        load_adapter(torch.nn.Linear(1, 1), str(adapter))


def test_a_merged_base_model_refuses_a_gmoe_adapter(setup, tmp_path):
    import transformers

    import gmoe
    from gmoe.io import MERGED_MARK

    _, model, _, run, _ = setup
    for merge in ("merge_and_unload", "merge_attention"):
        wrapped = gmoe.GMoEModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model),
                                                 run / "adapter")
        merged = wrapped.merge_and_unload(drop_experts=True) if merge == "merge_and_unload" else \
            wrapped.merge_attention().unload()
        assert getattr(merged.config, MERGED_MARK)["r"] == SPEC["r"]
        with pytest.raises(ValueError, match="attention LoRAs were already merged into its weights"):
            gmoe.GMoEModel.from_pretrained(merged, run / "adapter")
    merged.save_pretrained(tmp_path / "merged")  # the mark travels with config.json
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with pytest.raises(ValueError, match="already merged"):
        gmoe.GMoEModel.from_pretrained(again, run / "adapter")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(model)
    assert isinstance(gmoe.GMoEModel.from_pretrained(fresh, run / "adapter"), gmoe.GMoEModel)


def test_eval_takes_the_recorded_task_and_notes_what_differs(setup, capsys):
    _, model, _, run, _ = setup
    cfg = parse_command("eval", ["--model", model, "--adapter", str(run / "adapter")])
    out = capsys.readouterr().out
    assert cfg.task == "obqa"
    assert "GMoE adapter: E 4, K 2, r 2, alpha 4, graph router; method gmoe, seed 0, trained on task obqa" in out
    assert "scoring task obqa, the one recorded at training (--task to score another)" in out
    assert "note: --max-length 256 differs from the 64 recorded at training" in out
    cfg = parse_command("eval", ["--model", model, "--adapter", str(run / "adapter"), "--task", "arc-e",
                                 "--max-length", "64"])
    out = capsys.readouterr().out
    assert cfg.task == "arc-e" and "note: --task arc-e differs from the obqa recorded at training" in out
    assert "--max-length" not in out


def test_routing_takes_the_recorded_task_and_needs_one(setup, tmp_path, capsys, monkeypatch):
    from gmoe.finetune import routing

    _, model, _, run, lora = setup
    seen = []
    monkeypatch.setattr(routing, "report_routing", lambda *args: seen.append(args) or {})
    assert main(["routing", "--model", model, "--adapter", str(run / "adapter")]) == 0
    assert seen[-1][1] == "obqa"
    out = capsys.readouterr().out
    assert "trained on task obqa" in out and "routing the held-out examples of obqa (the task recorded at " \
        "training)" in out
    bare = _copy(run / "adapter", tmp_path / "bare")  # no results.json beside it
    assert main(["routing", "--model", model, "--adapter", str(bare)]) == 2
    assert "has no results.json beside it recording its task: pass --task" in capsys.readouterr().err
    assert main(["routing", "--model", model, "--adapter", str(bare), "--task", "piqa"]) == 0
    assert seen[-1][1] == "piqa"
    assert main(["routing", "--model", model, "--adapter", str(lora), "--task", "piqa"]) == 2
    assert "is a PEFT LoRA adapter, not a GMoE adapter: it has no router to report on" in capsys.readouterr().err
