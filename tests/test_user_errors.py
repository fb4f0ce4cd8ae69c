"""Every mistake a user makes gets a clear, early answer: an unknown flag is one line with the closest
flags (no traceback, exit status 2), GMoEConfig's field names are flags, --help and usage errors load
no heavy package, optional dependencies print nothing, a named split that does not exist is refused
with the ones that do, and a learning-rate schedule that would not train is refused with the fix.
The schedule's model is checked against transformers' own Trainer and scheduler."""
import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys

import pytest

from gmoe.finetune.cli import main, parse_command
from tests.finetune_assets import TINY_RUN, task_rows, tiny_job_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_files(tmp_path_factory.mktemp("user-errors"))


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any data or model load fails the test: the answer must come first."""
    def loaded(*args, **kwargs):
        raise AssertionError("loaded a model before answering")

    monkeypatch.setattr("gmoe.finetune.assets.load_base_model", loaded)


def _usage_error(argv, capsys) -> str:
    """The stderr of a usage error, checked to be one line with exit status 2."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ----- flags

@pytest.mark.parametrize("argv,line", [
    (["run", "--lerning-rate", "1e-4"],
     "gmoe-finetune run: error: unrecognized argument --lerning-rate (did you mean --lr?)"),
    (["--num-expert", "0"], "gmoe-finetune run: error: unrecognized argument --num-expert (did you mean --experts?)"),
    (["compare", "--max-step", "3"],
     "gmoe-finetune compare: error: unrecognized argument --max-step (did you mean --max-steps?)"),
    (["eval", "--lr", "3"],
     "gmoe-finetune eval: error: unrecognized argument --lr (an option of run, compare, not of this command)"),
    (["run", "--gcn-dim", "64"], "gmoe-finetune run: error: unrecognized argument --gcn-dim (GMoEConfig.gcn_dim is "
     "fixed by --method, see docs/finetune.md; the adapter flags are --r, --alpha, --dropout, --experts, --top-k)"),
    (["routing", "--epochs", "1"],
     "gmoe-finetune routing: error: unrecognized argument --epochs (an option of run, compare, not of this command)"),
    (["run", "--task", "arc_c"], "gmoe-finetune run: error: argument --task: invalid choice: 'arc_c' (did you mean "
     "arc-c or arc-e? choose from arc-c, arc-e, boolq, obqa, siqa, piqa, hellaswag, winogrande, a comma list of "
     "them, or commonsense)"),
])
def test_an_unknown_flag_is_one_line_with_the_closest_flags(capsys, nothing_loads, tmp_path, monkeypatch, argv, line):
    monkeypatch.chdir(tmp_path)  # a flag taken for another (an abbreviation) would start a job here
    assert _usage_error(argv, capsys) == line


def test_every_gmoe_config_field_is_a_flag_or_named_as_fixed_by_the_method():
    from gmoe import GMoEConfig
    from gmoe.finetune.options import ALIASES, METHOD_FIELDS

    cfg = parse_command("run", ["--num-experts", "4", "--top_k", "1", "--r", "4", "--lora-alpha", "8",
                                "--lora_dropout", "0.1", "--learning-rate", "0.002", "--num-train-epochs", "3"])
    assert (cfg.experts, cfg.top_k, cfg.r, cfg.alpha, cfg.dropout, cfg.lr, cfg.epochs) == (4, 1, 4, 8.0, 0.1, 0.002, 3)
    flags = {name for names in ALIASES.values() for name in names} | {"top_k", "r"}
    for field in dataclasses.fields(GMoEConfig):
        assert field.name in flags or field.name in METHOD_FIELDS, field.name


def test_help_and_usage_errors_load_no_heavy_package():
    """In a fresh interpreter: `run --help`, an unknown flag and `routing --help` leave torch,
    transformers, DeepSpeed and bitsandbytes unimported (their import is what took seconds)."""
    code = ("import sys\nfrom gmoe.finetune.cli import main\n"
            "for argv in (['run', '--help'], ['--lerning-rate', '1'], ['routing', '--help'], ['eval', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'bitsandbytes', 'datasets', 'peft')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_optional_dependencies_print_nothing_on_a_normal_run():
    """After a command line is parsed, importing bitsandbytes and choosing DeepSpeed's accelerator (as
    PEFT and Accelerate do in a run) prints neither one's start-up notice."""
    code = ("from gmoe.finetune.cli import parse_command\nparse_command('run', ['--task', 'obqa'])\n"
            "import bitsandbytes\nfrom deepspeed.accelerator import get_accelerator\nget_accelerator()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"})
    assert out.returncode == 0, out.stderr
    printed = out.stdout + out.stderr
    assert "kernels-community" not in printed and "Setting accelerator to CPU" not in printed, printed


# ----- named splits

def _dict_folder(path, **splits):
    import datasets

    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return str(path)


def test_a_named_split_that_does_not_exist_lists_the_splits_that_do(setup, tmp_path, capsys, nothing_loads):
    from gmoe.finetune.data import prepare_data

    folder = _dict_folder(tmp_path / "d", train=task_rows("obqa", 8), validation=task_rows("obqa", 6))
    with pytest.raises(ValueError, match=r"has no split 'trian' \(it has \['train', 'validation'\]\): pass one of "
                                         "them as --train-split"):
        prepare_data(parse_command("run", ["--task", "obqa", "--dataset", folder, "--train-split", "trian"]))
    assert main(["run", "--model", setup[1], "--task", "obqa", "--dataset", folder, "--train-split", "trian",
                 "--method", "lora", "--output-dir", str(tmp_path / "out"), *TINY_RUN]) == 2
    assert "has no split 'trian'" in capsys.readouterr().err
    only_val = _dict_folder(tmp_path / "v", validation=task_rows("obqa", 6))
    with pytest.raises(ValueError, match="has no split 'training'"):
        prepare_data(parse_command("run", ["--task", "obqa", "--dataset", only_val, "--train-split", "training"]))
    cut = prepare_data(parse_command("run", ["--task", "obqa", "--dataset", only_val]))  # the default: cut in two
    assert cut.split["case"] == "cut validation"


def test_a_hub_split_named_that_does_not_exist_lists_the_splits(monkeypatch):
    import datasets

    from gmoe.finetune.data import prepare_data

    def load_dataset(name, config=None, split=None):
        if split != "validation":
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train', 'validation'].")
        return datasets.Dataset.from_list(task_rows("piqa", 6))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ValueError, match=r"has no split 'trian' \(it has \['train', 'validation'\]\)"):
        prepare_data(parse_command("run", ["--task", "piqa", "--dataset", "baber/piqa", "--train-split", "trian"]))


# ----- learning-rate schedules

@pytest.mark.parametrize("steps,ratio", [(1, 0.1), (2, 0.1), (5, 0.9), (63, 0.1), (10, 0.0), (3, 0.5)])
def test_the_schedule_model_is_transformers_linear_schedule(steps, ratio):
    import torch
    import transformers

    from gmoe.finetune.validate import schedule

    args = transformers.TrainingArguments(output_dir="unused", warmup_ratio=ratio, report_to="none") \
        if "warmup_ratio" in inspect.signature(transformers.TrainingArguments.__init__).parameters else \
        transformers.TrainingArguments(output_dir="unused", warmup_steps=float(ratio), report_to="none")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, args.get_warmup_steps(steps), steps)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert schedule(steps, ratio) == pytest.approx(rates, abs=1e-12)


@pytest.mark.parametrize("examples,batch,accum,epochs", [(4, 8, 1, 1.0), (17, 8, 1, 2.0), (10, 2, 3, 1.0),
                                                         (500, 8, 1, 1.0), (9, 4, 2, 0.5)])
def test_the_step_count_is_the_trainers(tmp_path, examples, batch, accum, epochs):
    import torch
    import transformers

    from gmoe.finetune.validate import optimizer_steps

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                                          gradient_accumulation_steps=accum, num_train_epochs=epochs,
                                          report_to="none", use_cpu=True)
    trainer = transformers.Trainer(model=torch.nn.Linear(1, 1), args=args)
    loader = torch.utils.data.DataLoader(list(range(examples)), batch_size=batch)
    max_steps = trainer.set_initial_training_values(args, loader)[-1]
    assert optimizer_steps(examples, batch, accum, epochs) == max_steps


def test_a_budget_that_would_not_train_is_refused_with_the_fix(setup, capsys, nothing_loads):
    from gmoe.finetune.validate import check_schedule

    root, model, data = setup
    base = ["--model", model, "--task", "obqa", "--train-file", data, "--output-dir", str(root / "sched"),
            "--batch-size", "4", "--r", "2", "--alpha", "4", "--experts", "4", "--top-k", "2", "--max-length", "64"]
    assert main([*base, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--max-steps 1 gives 1 optimizer step(s) and --warmup-ratio 0.1 makes 1 of them warm-up steps: no step " \
           "trains" in err and "pass --warmup-ratio 0 (no warm-up) or a budget of at least 2 steps" in err
    # --epochs: 8 training examples in one batch of 8 are one step
    assert main([*base, "--batch-size", "8", "--epochs", "1"]) == 2
    assert "--epochs 1 on 8 training examples at --batch-size 8 x --grad-accum 1 gives 1 optimizer step(s)" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="step 1 runs at learning rate 0 and the peak --lr is never reached"):
        check_schedule(5, 0.9, "--max-steps 5")


@pytest.mark.parametrize("steps,ratio", [(63, 0.1), (2, 0.1), (2, 0.5), (10, 0.85), (1, 0.0)])
def test_a_first_step_at_zero_with_later_steps_above_it_is_accepted(steps, ratio):
    """The routing study's 63 steps (its first at learning rate 0, as transformers' warm-up always
    has) and every budget whose warm-up ends before its last step train: accepted."""
    from gmoe.finetune.validate import check_schedule, schedule

    check_schedule(steps, ratio, "budget")
    assert any(r > 0 for r in schedule(steps, ratio))
    assert math.ceil(steps * ratio) < steps or ratio == 0


def test_the_presets_train_on_their_data():
    """Every shipped preset's budget passes the schedule check on its task's packaged training part."""
    from gmoe.finetune.data import prepare_data
    from gmoe.finetune.options import preset_names

    for name in preset_names():
        cfg = parse_command("run", ["--preset", name])
        prepare_data(cfg)  # raises on a budget that would not train


def test_results_json_is_not_needed_to_parse(tmp_path):
    """A recorded results.json without a task does not stop eval from parsing (the default task stays)."""
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "GMOE"}))
    (tmp_path / "run" / "results.json").write_text(json.dumps({"adapter_sha256": {}}))
    assert parse_command("eval", ["--adapter", str(adapter)]).task == "arc-c"
