"""lm-evaluation-harness itself on a saved GMoE adapter, offline: a local ARC task built on lm-eval's own
arc_easy.yaml (its prompt, choices, target and metrics) over rows in a JSONL, scored through
`run_harness` (in memory) and through the registered `gmoe` model type (base folder + adapter folder),
and compared with this package's scorer example by example."""
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'gmoe-kernels[harness]')")

from tests.finetune_assets import task_rows, tiny_model_folder, write_jsonl  # noqa: E402

TASK = "arc_challenge_local"
EXTRA_ROWS = [
    {"id": "y1", "question": "What do bees make?",
     "choices": {"text": ["honey", "rocks", "glass", "steel"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "y2", "question": "Which planet is closest to the sun?",
     "choices": {"text": ["Mars", "Mercury", "Saturn"], "label": ["A", "B", "C"]}, "answerKey": "B"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers

    import gmoe
    from gmoe.finetune.methods import AdapterSpec, gmoe_config

    d = tmp_path_factory.mktemp("harness")
    folder = tiny_model_folder(d / "base")
    torch.manual_seed(1)
    model = gmoe.get_gmoe_model(transformers.AutoModelForCausalLM.from_pretrained(folder),
                                gmoe_config("gmoe", AdapterSpec(r=2, alpha=4, dropout=0.0, experts=4, top_k=2)))
    with torch.no_grad():  # non-zero B so the adapter changes the scores
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(d / "adapter")
    rows = task_rows("arc-c", 3) + task_rows("arc-e", 3) + EXTRA_ROWS
    data = write_jsonl(d / "arc.jsonl", rows)
    arc_yaml = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "arc", "arc_easy.yaml")
    (d / "tasks").mkdir()
    # lm-eval's ARC task with only the data swapped for the local file (splits: validation alone)
    (d / "tasks" / f"{TASK}.yaml").write_text(
        f"include: {arc_yaml}\ntask: {TASK}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n  cache_dir: {d / 'datasets_cache'}\n"
        "training_split: null\nvalidation_split: validation\ntest_split: null\n")
    return {"folder": folder, "adapter": str(d / "adapter"), "rows": rows, "task_dir": str(d / "tasks")}


def _tokenizer(folder):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    return tok


def _load(setup):
    import transformers

    import gmoe

    base = transformers.AutoModelForCausalLM.from_pretrained(setup["folder"])
    return gmoe.GMoEModel.from_pretrained(base, setup["adapter"])


def _lls(samples):
    """Per document (in doc order): lm-eval's log-likelihood of each choice, and its acc / acc_norm."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    return ([[r[0] for r in s["filtered_resps"]] for s in samples],
            [s["acc"] for s in samples], [s["acc_norm"] for s in samples])


def test_run_harness_matches_package_scorer_per_example(setup):
    import transformers

    from gmoe.finetune.harness import harness_output, run_harness
    from gmoe.finetune.scoring import evaluate
    from gmoe.finetune.tasks import get_task, to_examples

    model, tok = _load(setup), _tokenizer(setup["folder"])
    examples = to_examples(get_task("arc-c"), setup["rows"], "rows")
    ours = evaluate(model, tok, examples, batch_size=3, max_length=128)

    out = harness_output(model, tok, [TASK], batch_size=4, task_dir=setup["task_dir"], log_samples=True)
    res = out["results"][TASK]
    assert res["sample_len"] == len(examples) == 8
    lls, acc, acc_norm = _lls(out["samples"][TASK])
    # the same numbers: log-likelihoods (fp32, different batching), and every prediction
    for theirs, mine in zip(lls, ours["loglikelihoods"]):
        assert theirs == pytest.approx(mine, abs=1e-4)
    assert acc == [float(p == ex.gold) for p, ex in zip(ours["predictions"], examples)]
    assert acc_norm == [float(p == ex.gold) for p, ex in zip(ours["predictions_norm"], examples)]
    assert res["acc,none"] == ours["acc"] and res["acc_norm,none"] == ours["acc_norm"]
    assert 0 < ours["acc"] < 1 or 0 < ours["acc_norm"] < 1  # not a degenerate all-or-nothing case

    # run_harness: the per-task results dict alone, the same values; limit cuts the documents
    results = run_harness(model, tok, [TASK], batch_size=8, task_dir=setup["task_dir"])
    assert set(results) == {TASK}
    assert results[TASK]["acc,none"] == res["acc,none"] and results[TASK]["acc_norm,none"] == res["acc_norm,none"]
    assert run_harness(model, tok, [TASK], limit=3, task_dir=setup["task_dir"])[TASK]["sample_len"] == 3

    # the adapter is really used: the bare base model scores differently
    bare = transformers.AutoModelForCausalLM.from_pretrained(setup["folder"])
    bare_lls, _, _ = _lls(harness_output(bare, tok, [TASK], task_dir=setup["task_dir"], log_samples=True)
                          ["samples"][TASK])
    assert max(abs(a - b) for x, y in zip(bare_lls, lls) for a, b in zip(x, y)) > 0.1


def test_gmoe_model_type_loads_base_and_adapter_folders(setup):
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import gmoe.finetune.harness as harness
    from gmoe.finetune.harness_model import GMoELM

    assert get_model(harness.MODEL_TYPE) is GMoELM
    manager = TaskManager(include_path=setup["task_dir"], include_defaults=False)
    out = lm_eval.simple_evaluate(model="gmoe", model_args={"pretrained": setup["folder"], "adapter": setup["adapter"]},
                                  tasks=[TASK], device="cpu", batch_size=4, task_manager=manager, log_samples=True)
    lm = out["samples"][TASK]
    in_memory = harness.harness_output(_load(setup), _tokenizer(setup["folder"]), [TASK], batch_size=4,
                                       task_dir=setup["task_dir"], log_samples=True)
    for theirs, mine in zip(_lls(lm)[0], _lls(in_memory["samples"][TASK])[0]):
        assert theirs == pytest.approx(mine, abs=1e-5)
    assert out["results"][TASK]["acc,none"] == in_memory["results"][TASK]["acc,none"]
    assert out["results"][TASK]["acc_norm,none"] == in_memory["results"][TASK]["acc_norm,none"]
    with pytest.raises(ValueError, match="adapter="):
        GMoELM(pretrained=setup["folder"], device="cpu")
    with pytest.raises(ValueError, match="not peft="):
        GMoELM(pretrained=setup["folder"], adapter=setup["adapter"], peft=setup["adapter"], device="cpu")


def test_run_harness_checks_its_arguments():
    from gmoe.finetune.harness import run_harness

    for tasks in ("arc_challenge", [], [""]):
        with pytest.raises(ValueError, match="tasks"):
            run_harness(None, None, tasks)
    with pytest.raises(ValueError, match="batch_size"):
        run_harness(None, None, ["arc_challenge"], batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        run_harness(None, None, ["arc_challenge"], limit=0)
