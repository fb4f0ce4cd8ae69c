"""The multi-task study's statistics against hand and brute-force computations."""
import collections
import math
import statistics

import pytest

from benchmarks.multitask.report import (DOCS_END, DOCS_START, accuracy, accuracy_table, difference, docs_page,
                                         embed_in_docs, macro_correct, main, routing_figure,
                                         task_expert_information, task_expert_information_by_layer)


def _record(tokens, layers):
    return {"tokens": tokens, "layers": [{"slot_share": s} for s in layers]}


def test_task_expert_information_against_counting_slots():
    # two layers; task a routes to experts 0/1, task b to 1/2 in layer 0 and like a in layer 1
    per_task = {"a": _record(30, [[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]),
                "b": _record(10, [[0.0, 0.4, 0.6], [0.2, 0.3, 0.5]])}
    brute = []
    for layer in range(2):
        events = collections.Counter()
        for t, r in per_task.items():
            for e, s in enumerate(r["layers"][layer]["slot_share"]):
                events[(t, e)] += round(1000 * r["tokens"] * s)  # slots as counts
        n = sum(events.values())
        pt = collections.Counter()
        pe = collections.Counter()
        for (t, e), c in events.items():
            pt[t] += c
            pe[e] += c
        info = sum(c / n * math.log((c / n) / (pt[t] / n * pe[e] / n)) for (t, e), c in events.items() if c)
        brute.append(info / -sum(c / n * math.log(c / n) for c in pt.values()))
    assert brute[1] == pytest.approx(0.0, abs=1e-12)  # the same spread in both tasks: nothing to tell
    assert task_expert_information(per_task) == pytest.approx(statistics.fmean(brute), rel=1e-9)


def test_task_expert_information_is_one_when_the_expert_names_the_task():
    per_task = {"a": _record(5, [[1.0, 0.0]]), "b": _record(5, [[0.0, 1.0]])}
    assert task_expert_information(per_task) == pytest.approx(1.0)
    assert task_expert_information({"a": per_task["a"]}) is None  # one task: nothing to measure


def test_routing_figure_draws_the_per_layer_information_of_every_method(tmp_path):
    named = {"a": _record(5, [[1.0, 0.0], [0.5, 0.5]]), "b": _record(5, [[0.0, 1.0], [0.5, 0.5]])}
    assert task_expert_information_by_layer(named) == pytest.approx([1.0, 0.0])
    run = {"routing": {"tasks": {t: {"injection": r, "trained": r} for t, r in named.items()}}}
    path = routing_figure("a+b", {"gmoe": [run, run], "mixlora": [run]}, str(tmp_path / "figure.png"))
    assert path and (tmp_path / "figure.png").stat().st_size > 0
    assert routing_figure("a+b", {"lora": [{"routing": {}}]}, str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()


def test_macro_correct_weighs_each_task_the_same():
    golds = {"a": [0, 1], "b": [0, 0, 0, 0]}
    run = {"finetuned": {"tasks": {"a": {"predictions": [0, 0]}, "b": {"predictions": [0, 0, 0, 1]}}}}
    (row,) = macro_correct([run], golds)
    assert statistics.fmean(row) == pytest.approx((0.5 + 0.75) / 2)  # the macro accuracy
    other = {"finetuned": {"tasks": {"a": {"predictions": [0, 1]}, "b": {"predictions": [1, 1, 1, 1]}}}}
    mean, se = difference(macro_correct([run, run], golds), macro_correct([other, other], golds))
    assert mean == pytest.approx((0.5 + 0.75) / 2 - (1.0 + 0.0) / 2)
    assert se > 0


def _run(seed, predictions):
    return {"seed": seed, "finetuned": {"acc": 0.0, "tasks": {"a": {"acc": 0.0, "predictions": predictions}}}}


def test_accuracy_compares_each_method_with_the_baselines_before_it():
    golds = {"a": [0, 1, 1, 0]}
    methods = {"lora": [_run(0, [0, 1, 0, 0]), _run(1, [0, 0, 0, 0])],
               "lora-matched": [_run(0, [0, 1, 1, 0])],
               "gmoe": [_run(0, [1, 1, 1, 0]), _run(1, [0, 1, 1, 0])]}
    rows = accuracy(methods, golds, ["lora", "lora-matched"])
    assert rows["lora"]["versus"] == {}
    assert list(rows["lora-matched"]["versus"]) == ["lora"]  # not with itself, nor lora with the baseline after it
    vs = rows["gmoe"]["versus"]
    assert vs["lora"]["seeds"] == 2 and vs["lora-matched"]["seeds"] == 1  # only the seeds both have
    # correct answers, seed 0: gmoe 3/4, lora 3/4; seed 1: gmoe 4/4, lora 2/4 -> +0.25 over both seeds;
    # against lora-matched (seed 0 only, 4/4): -0.25
    assert vs["lora"]["macro"][0] == pytest.approx(0.25)
    assert vs["lora-matched"]["macro"][0] == pytest.approx(-0.25)
    lines = accuracy_table("a", rows, golds, {"a": 0.5}, {"acc": 0.5, "tasks": {"a": {"acc": 0.5}}},
                           ["lora", "lora-matched"])
    assert sum(line.startswith("| Δ vs `lora-matched`") for line in lines) == 1
    assert sum("Smallest macro difference" in line for line in lines) == 2


def test_embed_in_docs_replaces_only_the_part_between_the_markers(tmp_path):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text(f"# Page\nbefore\n{DOCS_START}\nold tables\n{DOCS_END}\nafter\n", encoding="utf-8")
    root = tmp_path / "results"
    lines = ["### a+b: accuracy (%), mean ± std", "", "| x |", "", "![figure](a+b/fig.png)", ""]
    embed_in_docs(str(page), docs_page(str(page)), lines, str(root))
    text = page.read_text(encoding="utf-8")
    assert "old tables" not in text and text.startswith("# Page\nbefore\n") and text.endswith(f"{DOCS_END}\nafter\n")
    assert "**a+b: accuracy** (%), mean ± std" in text
    assert "![figure](../results/a+b/fig.png)" in text  # the link works from the page's folder
    embed_in_docs(str(page), docs_page(str(page)), lines, str(root))
    assert page.read_text(encoding="utf-8") == text  # running it again changes nothing
    page.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="needs the line"):
        docs_page(str(page))
    with pytest.raises(SystemExit, match="cannot read"):
        docs_page(str(tmp_path / "missing.md"))


def test_report_refuses_a_bad_page_or_reference_before_any_work(tmp_path, capsys):
    # refused before the records are read: argparse's one line and status 2, or the page's one line
    with pytest.raises(SystemExit) as stop:
        main(["--root", str(tmp_path), "--references", "lora,lora-mached"])
    assert stop.value.code == 2 and "lora-mached is not a method of the study" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read"):
        main(["--root", str(tmp_path), "--docs", str(tmp_path / "missing.md")])
