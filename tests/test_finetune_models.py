"""--model as an alias, a folder, a .gguf file or a hub id (from_pretrained, mocked: no hub here), the
offline error, --dtype and what follows from it (mixed precision, the budget, fp32 router state),
--gradient-checkpointing, --attn-implementation and --report-to."""
import json

import pytest
import torch

from tests.finetune_assets import task_rows, tiny_model_folder, write_jsonl
from gmoe.finetune import assets
from gmoe.finetune.cli import main, parse_command

TINY = ["--max-steps", "2", "--batch-size", "4", "--eval-batch-size", "8", "--r", "2", "--alpha", "4",
        "--experts", "4", "--top-k", "2", "--log-steps", "1", "--max-length", "64"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return root, tiny_model_folder(root / "tiny"), write_jsonl(root / "obqa.jsonl", task_rows("obqa", 16))


def test_what_names_a_hub_id():
    assert assets.is_hub_id("HuggingFaceTB/SmolLM2-135M") and assets.is_hub_id("gpt2")
    for name in ("smollm2-135m", "/abs/missing", "./rel", "a/b/c", "x.gguf", "bad name"):
        assert not assets.is_hub_id(name), name


def test_a_hub_id_goes_through_from_pretrained(monkeypatch, setup):
    import transformers

    _, folder, _ = setup
    calls = []
    real_tok, real_model = transformers.AutoTokenizer.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained

    def tok(name, **kwargs):
        calls.append(("tokenizer", name, kwargs))
        return real_tok(folder)

    def model(name, **kwargs):
        calls.append(("model", name, kwargs))
        return real_model(folder, dtype=kwargs["dtype"])

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    m, t = assets.load_base_model("HuggingFaceTB/SmolLM2-135M", torch.bfloat16, attn_implementation="eager")
    assert calls[0] == ("tokenizer", "HuggingFaceTB/SmolLM2-135M", {})
    assert calls[1] == ("model", "HuggingFaceTB/SmolLM2-135M", {"dtype": torch.bfloat16, "attn_implementation": "eager"})
    assert m.dtype == torch.bfloat16 and t.pad_token is not None and not m.training


@pytest.mark.parametrize("offline", ["1", ""])
def test_an_unreachable_hub_names_hf_hub_offline_and_the_local_folder_way(monkeypatch, offline):
    import transformers

    def refuse(name, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}")

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(assets.MissingAssetError) as err:
        assets.load_base_model("someone/some-model")
    text = str(err.value)
    assert "HF_HUB_OFFLINE" in text and "--model DIR (a local folder)" in text and "someone/some-model" in text
    assert ("HF_HUB_OFFLINE=1 is set" in text) == bool(offline)


def test_a_missing_local_path_is_still_named_as_such(tmp_path):
    with pytest.raises(assets.MissingAssetError, match="neither a local folder nor a known alias"):
        assets.resolve_model(str(tmp_path / "no-model"))


def test_dtype_auto_is_bf16_on_a_capable_gpu_and_fp32_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert assets.resolve_dtype("auto") == torch.float32 and assets.resolve_dtype("bfloat16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert assets.resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert assets.resolve_dtype("auto") == torch.float32


def test_mixed_precision_checkpointing_and_report_to_follow_the_options(tmp_path):
    from gmoe.finetune.training import training_arguments

    def args(**kw):
        return training_arguments(str(tmp_path), 0, 1.0, 1e-3, 2, 1, 0.0, **kw)

    fp32 = args()
    ckpt = "activation_checkpointing" if hasattr(fp32, "activation_checkpointing") else "gradient_checkpointing"
    assert (fp32.bf16, fp32.fp16, getattr(fp32, ckpt), fp32.report_to) == (False, False, False, [])
    bf16 = args(dtype=torch.bfloat16, gradient_checkpointing=True, report_to="tensorboard")
    assert bf16.bf16 and not bf16.fp16 and bf16.report_to == ["tensorboard"]
    assert getattr(bf16, ckpt) and getattr(bf16, f"{ckpt}_kwargs") == {"use_reentrant": False}


def test_the_budget_names_the_dtype_only_when_it_is_not_float32(monkeypatch):
    from gmoe.finetune.job import JobConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    old_keys = set(JobConfig().training_budget())
    assert "dtype" not in old_keys and "dtype" not in JobConfig(dtype="float32").training_budget()
    assert JobConfig(dtype="bfloat16").training_budget()["dtype"] == "bfloat16"
    assert set(JobConfig(gradient_checkpointing=True, attn_implementation="eager").training_budget()) == old_keys
    cfg = parse_command("run", ["--dtype", "bfloat16", "--gradient-checkpointing", "--attn-implementation", "sdpa",
                                "--report-to", "tensorboard"])
    assert (cfg.dtype, cfg.gradient_checkpointing, cfg.attn_implementation, cfg.report_to) == (
        "bfloat16", True, "sdpa", "tensorboard")


def test_float16_without_a_gpu_is_refused_up_front(setup, capsys, monkeypatch):
    root, model, data = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["run", "--model", model, "--task", "obqa", "--train-file", data, "--dtype", "float16",
                 "--output-dir", str(root / "fp16"), *TINY]) == 2
    assert "--dtype float16 is invalid here" in capsys.readouterr().err


def test_a_bf16_base_trains_with_router_lambda_sigma_and_load_in_fp32(setup, monkeypatch):
    import gmoe.finetune.methods as M

    root, model, data = setup
    made = []
    real = M.apply_method
    monkeypatch.setattr(M, "apply_method", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    out = root / "bf16"
    assert main(["run", "--model", model, "--task", "obqa", "--train-file", data, "--dtype", "bfloat16",
                 "--gradient-checkpointing", "--output-dir", str(out), *TINY]) == 0
    res = json.loads((out / "obqa" / "gmoe" / "seed0" / "results.json").read_text())
    assert res["precision"] == {"dtype": "bfloat16", "asked": "bfloat16", "mixed_precision": "bf16",
                                "gradient_checkpointing": True, "attn_implementation": None}
    assert res["budget"]["dtype"] == "bfloat16" and res["train"]["steps"] == 2
    trained = made[0]
    state = dict(trained.named_parameters())
    state.update(trained.named_buffers())
    router = {n: t for n, t in state.items() if ".router." in n or "poisson_rate" in n or "normal_std" in n
              or "expert_load" in n}
    assert any("poisson_rate" in n for n in router) and any("expert_load" in n for n in router)
    assert {n: t.dtype for n, t in router.items() if t.is_floating_point() and t.dtype != torch.float32} == {}
    assert any(t.dtype == torch.bfloat16 for n, t in state.items() if "lora" not in n and n not in router)
    assert all(float(t.abs().sum()) > 0 for n, t in router.items() if "expert_load" in n)  # the load grew
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in trained.modules())
