"""The job end to end on a tiny Llama built from a config (no download): a two-step run per
method writing results.json, the adapter and the PNG plots; resuming; eval-only; bad input."""
import json
import os

import pytest

from tests.finetune_assets import TINY_RUN, tiny_job_files, task_rows, write_jsonl
from gmoe.finetune.cli import main



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_files(tmp_path_factory.mktemp("ft"))


def test_two_step_compare_writes_results_plots_and_resumes(setup, capsys):
    root, model, data = setup
    out = root / "runs"
    argv = ["compare", "--model", model, "--task", "obqa", "--methods", "gmoe,lora", "--train-file", data,
            "--output-dir", str(out), *TINY_RUN]
    assert main(argv) == 0
    for method in ("gmoe", "lora"):
        run = out / "obqa" / method / "seed0"
        res = json.loads((run / "results.json").read_text())
        assert res["method"] == method and res["seed"] == 0 and res["train"]["steps"] == 2
        assert res["split"]["train_size"] == 8 and res["split"]["eval_size"] == 8 and res["split"]["split_seed"] == 1234
        for part in ("zero_shot", "finetuned"):
            assert 0.0 <= res[part]["acc"] <= 1.0 and 0.0 <= res[part]["acc_norm"] <= 1.0
        assert res["trainable_params"]["trainable"] > 0
        assert res["train"]["tokens_per_s"] > 0 and res["finetuned"]["tokens_per_s"] > 0
        assert res["peak_memory"]["mib"] > 0 and res["wall_seconds"] > 0
        assert res["versions"]["torch"] and res["machine"]["cpu_count"]
        rows = [r for r in res["train"]["log_history"] if "task_loss" in r]
        assert len(rows) == 2 and all("router_loss" in r for r in rows)
        assert (run / "loss.png").stat().st_size > 1000
        assert (run / "adapter" / "adapter_config.json").is_file()
        if method == "lora":
            assert res["routing"] == {"injection": None, "trained": None}
        if method == "gmoe":
            assert (run / "routing.png").stat().st_size > 1000
            history = res["train"]["routing_history"]
            assert [h["step"] for h in history] == [1, 2] and all(h["tokens"] > 0 for h in history)
            assert all("routing/busiest_share" in r for r in rows)
            for when in ("injection", "trained"):
                assert res["routing"][when]["tokens"] > 0 and len(res["routing"][when]["layers"]) == 2
            assert rows[0]["router_loss"] > 0
    summary = json.loads((out / "obqa" / "compare.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["zero-shot", "gmoe", "lora"]
    assert (out / "obqa" / "compare.png").stat().st_size > 1000
    assert "| gmoe |" in (out / "obqa" / "compare.md").read_text()
    capsys.readouterr()

    # resumable: finished (method, seed) pairs are skipped, not retrained
    stamp = os.path.getmtime(out / "obqa" / "gmoe" / "seed0" / "results.json")
    assert main(argv) == 0
    assert "already done" in capsys.readouterr().out
    assert os.path.getmtime(out / "obqa" / "gmoe" / "seed0" / "results.json") == stamp
    # other settings in the same folder: refused, naming the difference
    assert main([*argv, "--lr", "0.1"]) == 2
    assert "other settings" in capsys.readouterr().err

    # eval-only with the saved adapter gives the fine-tuned score again
    adapter = out / "obqa" / "gmoe" / "seed0" / "adapter"
    assert main(["eval", "--model", model, "--task", "obqa", "--train-file", data, "--output-dir", str(out),
                 "--max-length", "64", "--adapter", str(adapter)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "obqa" / "gmoe" / "seed0" / "results.json").read_text())
    assert f"acc {res['finetuned']['acc']:.4f}" in printed

    # the routing report of the saved adapter, beside a fresh injection of its config
    report = root / "routing.json"
    assert main(["routing", "--model", model, "--task", "obqa", "--adapter", str(adapter), "--max-examples", "8",
                 "--max-length", "64", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(report.read_text())
    assert rep["injection"]["examples"] == rep["trained"]["examples"] == 8
    assert rep["trained"]["tokens"] > 0 and len(rep["trained"]["layers"]) == 2
    assert printed.count("busiest") == 2 and "top set" in printed
    assert main(["routing", "--model", model, "--task", "obqa", "--adapter", str(out / "obqa" / "lora" / "seed0" /
                                                                                  "adapter")]) == 2
    assert "not a GMoE adapter" in capsys.readouterr().err
    # several tasks: their held-out examples interleaved, so both are among the first 8
    assert main(["routing", "--model", model, "--task", "obqa,arc-e", "--method", "gmoe-balanced", "--max-examples",
                 "8", "--max-length", "64", "--json", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["task"] == "arc-e+obqa" and rep["injection"]["examples"] == 8 and "trained" not in rep
    assert rep["split"]["tasks"].keys() == {"arc-e", "obqa"}
    with pytest.raises(SystemExit):
        main(["routing", "--model", model, "--task", "obqa,nope"])
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_methods_configs_and_parameter_counts():
    from tests.finetune_assets import tiny_tokenizer  # noqa: F401  (keeps the import graph of the module light)
    from gmoe.finetune.methods import METHODS, PEFT_METHODS, AdapterSpec, apply_method, gmoe_config, trainable_parameters
    from tests.models import tiny_model

    spec = AdapterSpec(r=2, alpha=4, experts=4, top_k=2)
    cfg = {m: gmoe_config(m, spec) for m in METHODS if m not in PEFT_METHODS}
    assert cfg["gmoe"].router == "graph" and cfg["gmoe"].poisson_loss_coef == 0.005 and cfg["gmoe"].normal_loss_coef == 8.0
    assert cfg["gmoe-no-graph"].router == "linear" and cfg["gmoe-no-graph"].normal_loss_coef == 8.0
    assert cfg["gmoe-no-graph"].poisson_loss_coef == 0.005
    assert cfg["gmoe-no-poisson"].poisson_loss_coef == 0 and cfg["gmoe-no-normal"].normal_loss_coef == 0
    assert (cfg["mixlora"].router, cfg["mixlora"].aux_loss_coef, cfg["mixlora"].poisson_loss_coef,
            cfg["mixlora"].normal_loss_coef) == ("linear", 0.01, 0.0, 0.0)
    options = {m: (cfg[m].load_decay, cfg[m].freeze_loss_params, cfg[m].token_coupling) for m in cfg}
    assert options["gmoe"] == (1.0, False, "degree")  # the paper's: cumulative load, trained λ/σ, GCN weights
    assert options["gmoe-window"] == (0.9, False, "degree") and options["gmoe-frozen"] == (1.0, True, "degree")
    assert options["gmoe-uniform"] == (1.0, False, "uniform") and options["gmoe-balanced"] == (0.9, False, "uniform")
    assert all(cfg[m].router == "graph" for m in ("gmoe-window", "gmoe-frozen", "gmoe-uniform", "gmoe-balanced"))
    counts = {m: trainable_parameters(apply_method(tiny_model(), m, spec))["trainable"] for m in METHODS}
    # hidden 32, inter 48, 2 layers, q/k/v/o with 4 heads / 2 kv heads of 8: in/out 32/32, 32/16, 32/16, 32/32
    attention = 2 * 2 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))
    lora_mlp = 2 * 2 * 3 * (32 + 48)
    assert counts["lora"] == attention + lora_mlp
    assert counts["mixlora"] == attention + 4 * lora_mlp + 2 * 4 * 32  # E experts + linear router [E, H] per layer
    assert counts["gmoe"] > counts["mixlora"]


def test_bad_input_gives_named_errors(setup, capsys):
    root, model, data = setup
    with pytest.raises(SystemExit):
        main(["--task", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["--model", model, "--task", "obqa", "--train-file", str(root / "missing.jsonl"),
                 "--output-dir", str(root / "x")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    wrong = write_jsonl(root / "wrong.jsonl", task_rows("piqa", 4))
    assert main(["--model", model, "--task", "obqa", "--train-file", wrong, "--output-dir", str(root / "x")]) == 2
    assert "lacks the field(s)" in capsys.readouterr().err
    assert main(["--model", str(root / "no-model"), "--task", "obqa", "--train-file", data,
                 "--output-dir", str(root / "x"), *TINY_RUN]) == 2
    assert "neither a local folder nor a known alias" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "gmoe,bogus"])
    assert "unknown method(s) ['bogus']" in capsys.readouterr().err


def test_presets_fill_unset_flags_only():
    from gmoe.finetune.cli import parse_command
    from gmoe.finetune.options import preset_values

    cfg = parse_command("compare", ["--task", "obqa", "--preset", "table", "--lr", "0.001"])
    assert cfg.preset == "table" and cfg.seeds == [0, 1, 2] and cfg.lr == 0.001
    assert (cfg.epochs, cfg.batch_size, cfg.r, cfg.experts, cfg.split_seed) == (2.0, 8, 8, 8, 1234)
    from gmoe.finetune.methods import METHODS

    assert cfg.methods == METHODS
    quick = parse_command("run", ["--quick", "--method", "lora"])
    assert (quick.task, quick.methods, quick.max_train_examples) == ("obqa", ["lora"],
                                                                     preset_values("quick")["max_train_examples"])
    assert parse_command("run", ["--seeds", "2", "--seed", "5"]).seeds == [5, 6]


#: training_budget() of each preset as the dict-based presets gave it: finished runs are recognised by it.
PRESET_BUDGETS = {
    "quick": {"task": "obqa", "epochs": 1.0, "max_train_examples": 200, "max_eval_examples": 100},
    "table": {"epochs": 2.0},
    "study": {"epochs": 1.0, "max_train_examples": 500},
    "demo": {"task": "piqa", "epochs": 1.0, "max_train_examples": 200, "batch_size": 4},
}
DEFAULT_BUDGET = {"model": "smollm2-135m", "task": "arc-c", "epochs": 2.0, "max_steps": -1, "lr": 0.0005,
                  "batch_size": 8, "grad_accum": 1, "max_length": 256, "warmup_ratio": 0.1, "r": 8, "alpha": 16.0,
                  "dropout": 0.05, "experts": 8, "top_k": 2, "train_file": None, "eval_file": None,
                  "split_seed": 1234, "eval_fraction": 0.5, "eval_size": None, "max_train_examples": None,
                  "max_eval_examples": None}


@pytest.mark.parametrize("preset", list(PRESET_BUDGETS))
def test_preset_files_give_the_budgets_of_finished_runs(preset):
    from gmoe.finetune.cli import parse_command

    cfg = parse_command("run", ["--preset", preset])
    budget = cfg.training_budget()
    assert budget == {**DEFAULT_BUDGET, **PRESET_BUDGETS[preset]}
    assert json.dumps(budget) == json.dumps({**DEFAULT_BUDGET, **PRESET_BUDGETS[preset]})  # 1.0 stays 1.0, not 1
    assert cfg.seeds == ([0] if preset in ("quick", "demo") else [0, 1, 2])
    assert cfg.log_steps == {"quick": 2, "table": 5, "study": 5, "demo": 5}[preset]


def test_presets_ship_with_the_package():
    import tomllib
    from pathlib import Path

    from gmoe.finetune.options import preset_names

    assert preset_names() == ["demo", "quick", "study", "table"]
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "presets/*.yaml" in project["tool"]["setuptools"]["package-data"]["gmoe.finetune"]


def test_a_config_file_maps_onto_the_options_and_flags_override_it(tmp_path, capsys):
    from gmoe.finetune.cli import main, parse_command

    job = tmp_path / "job.yaml"
    job.write_text("preset: table\ntask: boolq\nlr: 1e-4\nmax-length: 128\nmethods: lora,gmoe\nepochs: 3\n"
                   "force: true\n")
    cfg = parse_command("run", ["--config", str(job), "--lr", "0.002"])
    assert (cfg.task, cfg.lr, cfg.max_length, cfg.methods, cfg.force) == ("boolq", 0.002, 128, ["lora", "gmoe"], True)
    assert cfg.epochs == 3.0 and isinstance(cfg.epochs, float) and cfg.seeds == [0, 1, 2] and cfg.preset == "table"
    assert parse_command("run", ["--config", str(job)]).lr == 1e-4
    # a key no subcommand knows is named; a key another subcommand uses is ignored here
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        parse_command("run", ["--config", str(tmp_path / "bad.yaml")])
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err
    assert parse_command("eval", ["--config", str(job)]).task == "boolq"
    (tmp_path / "typo.yaml").write_text("epochs: two\n")
    with pytest.raises(SystemExit):
        main(["run", "--config", str(tmp_path / "typo.yaml")])
    assert "epochs: 'two' is not a float" in capsys.readouterr().err


def test_subcommands_help_and_the_bare_form(capsys):
    from gmoe.finetune.cli import main, parse_command, split_command

    assert main([]) == 2
    assert "{run,compare,eval,routing}" in capsys.readouterr().out
    for command in ("run", "compare", "eval", "routing"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: gmoe-finetune {command}" in text and "--model" in text and "--max_length" not in text
    assert split_command(["--task", "obqa"]) == ("run", ["--task", "obqa"])
    assert parse_command("run", ["--task", "obqa", "--max_steps", "3"]).max_steps == 3  # both spellings parse
    with pytest.raises(SystemExit):
        main(["--task", "obqa", "--eval-only"])
    assert "now the eval subcommand" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train"])
    assert "invalid choice: 'train'" in capsys.readouterr().err


def test_a_run_lock_is_held_until_released_and_stale_text_blocks_nothing(tmp_path):
    from gmoe.finetune.runlock import RunBusy, claim, lock_path

    out = str(tmp_path / "gmoe" / "seed0")
    lock = claim(out)  # ours now; the lock file sits beside the run folder, not in it
    assert lock_path(out) == str(tmp_path / "gmoe" / ".seed0.lock")
    with pytest.raises(RunBusy, match=f"being run by pid {os.getpid()} on"):
        claim(out)  # another open file description: refused as for another process
    lock.release()
    (tmp_path / "gmoe" / ".seed0.lock").write_text("pid 1 on elsewhere")  # text alone holds nothing
    claim(out).release()


def test_eval_harness_loads_the_adapter_and_writes_the_harness_results(setup, tmp_path, monkeypatch, capsys):
    """`eval --harness`: the base model + --adapter go to gmoe.finetune.harness.run_harness (a fake
    module here) with the tasks and options; its result is printed and written as JSON."""
    import sys
    import types

    import gmoe.finetune.methods as methods

    root, model, data = setup
    seen = {}

    def run_harness(model, tokenizer, tasks, *, batch_size=8, limit=None, task_dir=None, manager=None):
        seen.update(model=model, tokenizer=tokenizer, tasks=tasks, batch_size=batch_size, limit=limit,
                    task_dir=manager.dirs)
        return {t: {"acc,none": 0.25, "acc_norm,none": 0.5} for t in tasks}

    def task_manager(tasks, dirs):  # lm-eval's index of these tasks (their data local: no hub needed)
        return types.SimpleNamespace(dirs=dirs, all_tasks=list(tasks), task_index={})

    fake = types.ModuleType("gmoe.finetune.harness")
    fake.run_harness, fake.task_manager = run_harness, task_manager
    monkeypatch.setitem(sys.modules, "gmoe.finetune.harness", fake)
    monkeypatch.setattr("gmoe.finetune.harness", fake, raising=False)
    loaded = []
    real_load = methods.load_adapter
    monkeypatch.setattr(methods, "load_adapter", lambda m, p: loaded.append(p) or real_load(m, p))
    from gmoe.finetune.methods import AdapterSpec, apply_method
    from gmoe.finetune.assets import load_base_model

    base, _ = load_base_model(model)
    adapter = tmp_path / "adapter"
    apply_method(base, "gmoe", AdapterSpec(r=2, alpha=4, experts=4, top_k=2)).save_pretrained(adapter)
    (tmp_path / "tasks").mkdir()
    assert main(["eval", "--model", model, "--adapter", str(adapter), "--harness", "arc_challenge,boolq",
                 "--harness-limit", "5", "--harness-task-dir", str(tmp_path / "tasks"), "--harness-batch-size", "2",
                 "--output-dir", str(tmp_path / "out")]) == 0
    assert loaded == [str(adapter)]
    assert seen["tasks"] == ["arc_challenge", "boolq"] and (seen["batch_size"], seen["limit"]) == (2, 5)
    assert seen["task_dir"] == [str(tmp_path / "tasks")] and type(seen["model"]).__name__ == "GMoEModel"
    printed = capsys.readouterr().out
    assert "arc_challenge: acc,none 0.2500  acc_norm,none 0.5000" in printed
    path = printed.split("results: ")[1].strip()
    written = json.loads(open(path).read())
    assert written["results"]["boolq"] == {"acc,none": 0.25, "acc_norm,none": 0.5}
    assert written["adapter"] == str(adapter) and written["tasks"] == ["arc_challenge", "boolq"]
