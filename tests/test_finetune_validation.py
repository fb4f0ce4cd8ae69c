"""Bad input fails at once with a message naming the flag, file or field: arguments are all
checked before any data, model or output is touched; data rows, adapter configs and adapters
that would load with quiet damage are refused; benchmarks/run.py checks its arguments before
timing anything."""
import json
import os

import pytest
import torch

from tests.finetune_assets import TINY_RUN, tiny_job_files, ROWS, write_jsonl
from gmoe.finetune.cli import main
from gmoe.finetune.tasks import get_task, load_examples



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_files(tmp_path_factory.mktemp("valid"))


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any data or model load fails the test: validation must come first."""
    def loaded(*args, **kwargs):
        raise AssertionError("loaded data or a model before checking the arguments")

    monkeypatch.setattr("gmoe.finetune.job.prepare_data", loaded)
    monkeypatch.setattr("gmoe.finetune.assets.load_base_model", loaded)


BAD_ARGS = {
    "epochs-0": (["--epochs", "0"], "--epochs 0.0 is invalid"),
    "epochs-negative": (["--epochs", "-1"], "--epochs -1.0 is invalid"),
    "max-steps-0": (["--max-steps", "0"], "--max-steps 0 is invalid"),
    "max-train-negative": (["--max-train-examples", "-3"], "--max-train-examples -3 is invalid"),
    "eval-size-negative": (["--eval-size", "-5"], "--eval-size -5 is invalid"),
    "eval-batch-0": (["--eval-batch-size", "0"], "--eval-batch-size 0 is invalid"),
    "grad-accum-0": (["--grad-accum", "0"], "--grad-accum 0 is invalid"),
    "batch-0": (["--batch-size", "0"], "--batch-size 0 is invalid"),
    "lr-0": (["--lr", "0"], "--lr 0.0 is invalid"),
    "lr-nan": (["--lr", "nan"], "--lr nan is invalid"),
    "warmup": (["--warmup-ratio", "1.5"], "--warmup-ratio 1.5 is invalid"),
    "log-steps-0": (["--log-steps", "0"], "--log-steps 0 is invalid"),
    "r-0": (["--r", "0"], "--r 0 is invalid"),
    "dropout-1": (["--dropout", "1"], "--dropout 1.0 is invalid"),
    "top-k-above-experts": (["--top-k", "9"], "GMoEConfig.top_k=9 is invalid"),
    "eval-fraction": (["--eval-fraction", "1"], "--eval-fraction 1.0 is invalid"),
    "eval-steps-0": (["--eval-steps", "0"], "--eval-steps 0 is invalid"),
    "select-best-alone": (["--select", "best"], "--select best needs --eval-steps"),
    "selection-size-0": (["--eval-steps", "1", "--selection-size", "0"], "--selection-size 0 is invalid"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_fail_before_anything_is_loaded(setup, capsys, nothing_loads, case):
    root, model, data = setup
    extra, message = BAD_ARGS[case]
    argv = ["--model", model, "--task", "obqa", "--train-file", data, "--output-dir", str(root / case), *TINY_RUN, *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_output_dir_that_is_a_file_fails_up_front(setup, capsys, nothing_loads):
    root, model, data = setup
    (root / "a-file").write_text("x")
    assert main(["--model", model, "--task", "obqa", "--train-file", data, "--output-dir", str(root / "a-file"),
                 *TINY_RUN]) == 2
    assert "a-file exists and is not a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_fails_up_front(setup, capsys, nothing_loads):
    root, model, data = setup
    folder = root / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    assert main(["--model", model, "--task", "obqa", "--train-file", data, "--output-dir", str(folder), *TINY_RUN]) == 2
    assert "is not writable" in capsys.readouterr().err


def _adapter_folder(root, name, text: bytes):
    folder = root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(text)
    return folder


@pytest.mark.parametrize("case,text,message", [
    ("list", b'[{"peft_type": "GMOE"}]', "must hold a JSON object, got list"),
    ("corrupt", b'{"peft_type": ', "is not valid JSON"),
    ("latin1", b'{"peft_type": "\xe9"}', "is not UTF-8 text"),
])
def test_a_bad_adapter_config_is_named_before_loading(setup, capsys, nothing_loads, case, text, message):
    root, model, data = setup
    folder = _adapter_folder(root, f"cfg-{case}", text)
    assert main(["eval", "--model", model, "--task", "obqa", "--train-file", data, "--output-dir", str(root / "eo"),
                 "--adapter", str(folder)]) == 2
    assert f"{folder / 'adapter_config.json'} {message}" in capsys.readouterr().err


def test_a_peft_adapter_of_another_base_size_is_a_clear_error(tmp_path):
    import peft
    import transformers

    from gmoe.finetune.methods import AdapterSpec, load_adapter, lora_config

    def llama(hidden):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64))

    peft.get_peft_model(llama(64), lora_config(AdapterSpec(r=2))).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="does not fit this base model .*size mismatch"):
        load_adapter(llama(32), str(tmp_path / "a"))


# ----- data rows that would score with quiet damage

def _row(task, **changes):
    row = json.loads(json.dumps(ROWS[task]))
    for key, value in changes.items():
        parent, _, leaf = key.rpartition(".")
        (row[parent] if parent else row)[leaf] = value
    return row


BAD_ROWS = {
    "arc-labels": ("arc-c", _row("arc-c", **{"choices.text": ["oxygen", "carbon dioxide"]}),
                   "choices has 2 texts but 4 labels"),
    "piqa-float-label": ("piqa", _row("piqa", label=1.7), "label 1.7 must be a whole number"),
    "piqa-bool-label": ("piqa", _row("piqa", label=True), "label True must be a whole number"),
    "arc-null-question": ("arc-c", _row("arc-c", question=None), "question must be a string, got NoneType"),
    "obqa-empty-stem": ("obqa", _row("obqa", question_stem="  "), "question_stem must be a non-empty string"),
    "hellaswag-null-ctx-b": ("hellaswag", _row("hellaswag", ctx_b=None), "ctx_b must be a string"),
    "siqa-number-answer": ("siqa", _row("siqa", answerB=3), "choice 1 must be a string, got int"),
    "boolq-number-answer": ("boolq", _row("boolq", answer=5), "boolq answer 5 must be true/false"),
    "winogrande-null-option": ("winogrande", _row("winogrande", option2=None), "option2 must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_rows_with_quiet_damage_are_refused(tmp_path, case):
    task, row, message = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[task], row])
    with pytest.raises(ValueError, match=rf"rows.jsonl: row 1 is not a valid {task} row \({message}"):
        load_examples(get_task(task), path)


def test_a_non_utf8_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(ROWS["obqa"]).encode() + b"\n" + json.dumps(ROWS["obqa"]).encode()
                     .replace(b"The sun", b"The s\xfcn") + b"\n")
    with pytest.raises(ValueError, match=r"latin1.jsonl:2 is not UTF-8 text"):
        load_examples(get_task("obqa"), str(path))


# ----- benchmarks/run.py

@pytest.mark.parametrize("argv,message", [
    (["--impls", "nope"], "--impls: unknown ['nope']"),
    (["--threads", "0"], "--threads 0: must be at least 1"),
    (["--json", "{tmp}"], "is a folder; pass a file name"),
    (["--csv", "{tmp}/missing/x.csv"], "does not exist"),
])
def test_benchmark_arguments_are_checked_before_any_timing(tmp_path, monkeypatch, argv, message):
    from benchmarks import run

    def timed(*args, **kwargs):
        raise AssertionError("started timing before checking the arguments")

    monkeypatch.setattr(run.torch, "set_num_threads", timed)
    monkeypatch.setattr(run.Runner, "__init__", timed)
    with pytest.raises(SystemExit) as exc:
        run.main(["--device", "cpu", "--quick", *[a.format(tmp=tmp_path) for a in argv]])
    assert message in str(exc.value)


@pytest.mark.parametrize("value", [True, False])
def test_a_yaml_boolean_is_not_a_number(value):
    """YAML reads `lr: yes` as True, which Python would take as the number 1."""
    from gmoe.finetune.options import coerce

    for kind in (float, int):
        with pytest.raises(ValueError, match="is not a"):
            coerce("lr", value, kind)
    assert coerce("force", value, bool) is value
