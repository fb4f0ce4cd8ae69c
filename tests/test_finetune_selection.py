"""Checkpoint selection (--eval-steps, --select): the curve has a point per scored step, `best` keeps the
adapter of the best selection-set acc (ties: the earlier step) and saves it, the selection set is carved
out of the training part, and a run without --eval-steps is what it was (budget included)."""
import copy
import json

import pytest
import torch

from tests.finetune_assets import tiny_job_files
from gmoe.finetune.cli import main, parse_command
from gmoe.finetune.job import JobConfig, prepare_data

TINY = ["--batch-size", "4", "--eval-batch-size", "8", "--r", "2", "--alpha", "4", "--experts", "4",
        "--top-k", "2", "--log-steps", "1", "--max-length", "64", "--lr", "0.05"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_files(tmp_path_factory.mktemp("sel"), rows=40)


def _scores(model_dir, adapter, examples):
    from gmoe.finetune.assets import load_base_model
    from gmoe.finetune.methods import load_adapter
    from gmoe.finetune.scoring import evaluate

    base, tok = load_base_model(model_dir)
    res = evaluate(load_adapter(base, adapter), tok, examples, max_length=64)
    return res["acc"], res["acc_norm"]


def test_select_best_records_the_curve_and_saves_the_best_steps_adapter(setup, monkeypatch):
    """The saved adapter scores on the selection set what the curve says of the chosen step, and its files
    hold that step's adapter tensors exactly (on a flat curve the first step: not the last one)."""
    from safetensors.torch import load_file

    from gmoe.finetune import selection

    states = {}
    record = selection.Selector.record

    def recording(self, step):
        states.setdefault(type(self.model).__name__, {})[step] = selection.adapter_state(self.model)
        return record(self, step)

    monkeypatch.setattr(selection.Selector, "record", recording)
    root, model, data = setup
    out = root / "best"
    argv = ["compare", "--model", model, "--task", "obqa", "--methods", "gmoe,lora", "--train-file", data,
            "--output-dir", str(out), "--max-steps", "3", "--eval-steps", "1", "--select", "best",
            "--selection-size", "6", *TINY]
    assert main(argv) == 0
    cfg = parse_command("compare", argv[1:])
    selection_set = prepare_data(cfg).selection
    assert len(selection_set) == 6
    for method in ("gmoe", "lora"):
        res = json.loads((out / "obqa" / method / "seed0" / "results.json").read_text())
        sel = res["selection"]
        assert [p["step"] for p in sel["curve"]] == [1, 2, 3] and res["train"]["steps"] == 3
        best = max(p["acc"] for p in sel["curve"])
        assert sel["step"] == next(p["step"] for p in sel["curve"] if p["acc"] == best)  # ties: the earlier step
        assert (sel["select"], sel["size"], sel["seed"], sel["eval_steps"]) == ("best", 6, 1234, 1)
        point = next(p for p in sel["curve"] if p["step"] == sel["step"])
        adapter = out / "obqa" / method / "seed0" / "adapter"
        assert _scores(model, adapter, selection_set) == (point["acc"], point["acc_norm"])
        saved = load_file(str(adapter / "adapter_model.safetensors"))
        kept = states["GMoEModel" if method == "gmoe" else "PeftModelForCausalLM"]
        assert set(saved) == set(kept[sel["step"]])
        assert all(torch.equal(saved[k], kept[sel["step"]][k].cpu()) for k in saved)
        if sel["step"] != 3:
            assert not all(torch.equal(saved[k], kept[3][k].cpu()) for k in saved)
        assert res["budget"]["eval_steps"] == 1 and res["budget"]["select"] == "best"
        # 40 rows: 20 held out, 6 of the other 20 for selection, 14 trained on
        assert (res["split"]["train_used"], res["split"]["eval_used"]) == (14, 20)


def test_select_final_with_eval_steps_keeps_the_last_adapter_and_scores_the_last_step(setup):
    root, model, data = setup
    out = root / "final"
    assert main(["run", "--model", model, "--task", "obqa", "--method", "gmoe", "--train-file", data,
                 "--output-dir", str(out), "--max-steps", "3", "--eval-steps", "2", "--selection-size", "6",
                 *TINY]) == 0
    res = json.loads((out / "obqa" / "gmoe" / "seed0" / "results.json").read_text())
    sel = res["selection"]
    assert sel["select"] == "final" and sel["step"] == 3 and [p["step"] for p in sel["curve"]] == [2, 3]
    assert (sel["curve"][-1]["acc"], sel["curve"][-1]["acc_norm"]) == _scores(
        model, out / "obqa" / "gmoe" / "seed0" / "adapter", prepare_data(parse_command("run", [
            "--task", "obqa", "--train-file", data, "--eval-steps", "2", "--selection-size", "6"])).selection)


def test_without_eval_steps_nothing_is_carved_and_the_budget_is_unchanged(setup):
    root, model, data = setup
    plain = prepare_data(parse_command("run", ["--task", "obqa", "--train-file", data]))
    assert plain.selection == [] and plain.selection_info is None and len(plain.train) == 20
    old = set(JobConfig().training_budget())
    assert not old & {"eval_steps", "select", "selection_size"}
    assert set(JobConfig(select="final", selection_size=7).training_budget()) == old
    assert JobConfig(eval_steps=5).training_budget()["selection_size"] == 100
    carved = prepare_data(parse_command("run", ["--task", "obqa", "--train-file", data, "--eval-steps", "1",
                                                "--selection-size", "5", "--max-train-examples", "100"]))
    assert (len(carved.train), len(carved.selection), len(carved.eval)) == (15, 5, 20)
    assert carved.selection_info == {"size": 5, "seed": 1234, "from": "the training part", "training_part_size": 20}
    # the same split seed gives the same selection set, and the rest is the training part without it
    again = prepare_data(parse_command("run", ["--task", "obqa", "--train-file", data, "--eval-steps", "3",
                                               "--selection-size", "5"]))
    assert again.selection == carved.selection and again.train == carved.train
    with pytest.raises(ValueError, match="--selection-size 20 is invalid: it must be below the 20 examples"):
        prepare_data(parse_command("run", ["--task", "obqa", "--train-file", data, "--eval-steps", "1",
                                           "--selection-size", "20"]))


@pytest.mark.parametrize("method", ["gmoe", "lora"])
def test_the_selector_restores_the_state_of_the_first_best_step(method):
    """Scores 0.2, 0.5, 0.5, 0.3 at steps 1-4, the adapter changed between steps: the state of step 2 comes back."""
    from gmoe.finetune.methods import AdapterSpec, apply_method
    from gmoe.finetune.selection import Selector, adapter_state
    from tests.models import tiny_model

    model = apply_method(tiny_model(), method, AdapterSpec(r=2, alpha=4, experts=4, top_k=2))
    accs = iter([0.2, 0.5, 0.5, 0.3])
    selector = Selector(model, lambda m: {"acc": next(accs), "acc_norm": 0.0}, eval_steps=1, keep_best=True)
    states = []
    for step in range(1, 5):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and "lora_" in name:
                    p.add_(0.01 * torch.randn_like(p))
        states.append(copy.deepcopy(adapter_state(model)))
        selector.record(step)
    selector.restore_best()
    now = adapter_state(model)
    assert selector.best["step"] == 2 and set(now) == set(states[1])
    assert all(torch.equal(now[k], states[1][k]) for k in now)
    assert not all(torch.equal(now[k], states[3][k]) for k in now)
    assert selector.result("best", 4, 4)["step"] == 2 and selector.result("final", 4, 4)["step"] == 4
