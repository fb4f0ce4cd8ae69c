"""benchmarks/routing_study.py: the study's tables from run records, with hand-computed expectations."""
import dataclasses
import json
import math
import statistics

import pytest

from benchmarks import routing_study
from gmoe.finetune.job import JobConfig, prepare_data
from tests.finetune_assets import task_rows, write_jsonl


def _record(path, cfg, data, method, seed, predictions, routing=None, history=None):
    golds = [ex.gold for ex in data.eval]
    acc = statistics.fmean(float(p == g) for p, g in zip(predictions, golds))
    result = {"task": "siqa", "method": method, "seed": seed, "config": dataclasses.asdict(cfg), "split": data.split,
              "zero_shot": {"acc": 0.25, "acc_norm": 0.5, "predictions": [0] * len(golds)},
              "finetuned": {"acc": acc, "acc_norm": acc, "n": len(golds), "predictions": predictions},
              "routing": routing, "machine": {"cpu": "test cpu"}, "train": {"routing_history": history}}
    folder = path / "siqa" / method / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(result))
    return acc


def _routing(busiest_before, busiest_after):
    summary = {"busiest_share": busiest_before, "top_set_fraction": 0.5, "idle_experts": 1.0, "normal_std": 4.0}
    return {"injection": {"summary": summary}, "trained": {"summary": {**summary, "busiest_share": busiest_after}}}


def test_tables_from_records(tmp_path):
    rows = write_jsonl(tmp_path / "siqa.jsonl", task_rows("siqa", 24))
    cfg = JobConfig(task="siqa", train_file=rows, output_dir=str(tmp_path / "out"))
    data = prepare_data(cfg)
    golds = [ex.gold for ex in data.eval]
    n = len(golds)
    wrong = [(g + 1) % 3 for g in golds]
    # lora: seed 0 right on the first half, seed 1 right everywhere; gmoe: right on the first quarter
    lora = [_record(tmp_path, cfg, data, "lora", s, p) for s, p in
            enumerate([golds[: n // 2] + wrong[n // 2:], golds])]
    _record(tmp_path, cfg, data, "gmoe", 0, golds[: n // 4] + wrong[n // 4:], _routing(0.3, 0.5),
            history=[{"step": s, "num_experts": 4, "summary": {"busiest_share": 0.3, "top_set_fraction": 0.5}}
                     for s in (1, 2)])
    _record(tmp_path, cfg, data, "gmoe", 1, golds[: n // 4] + wrong[n // 4:], _routing(0.3, 0.7))

    text = routing_study.main(["--root", str(tmp_path)])

    assert f"n = {n} held-out examples, chance 33.3 %" in text
    # zero-shot (not recorded: every prediction 0) is right where the gold answer is 0
    zero_c = [float(g == 0) for g in golds]
    lora_c = [1.0] * (n // 2) + [0.5] * (n - n // 2)     # seed-averaged: seed 1 right everywhere
    gain = statistics.fmean(x - z for x, z in zip(lora_c, zero_c))
    gain_se = statistics.stdev([x - z for x, z in zip(lora_c, zero_c)]) / math.sqrt(n)
    assert (f"| `lora` | 2 | {100 * statistics.fmean(lora):.1f} ± {100 * statistics.stdev(lora):.1f} "
            f"| {100 * gain:+.1f} (SE {100 * gain_se:.1f}) | – | – |") in text
    # gmoe is right on the first quarter in both seeds
    gmoe_c = [1.0] * (n // 4) + [0.0] * (n - n // 4)
    d = [g - x for g, x in zip(gmoe_c, lora_c)]
    versus = f"{100 * statistics.fmean(d):+.1f} (SE {100 * statistics.stdev(d) / math.sqrt(n):.1f}) [2 shared seeds]"
    # same answer as lora's run of the same seed: seed 0 on the first quarter and the wrong second half,
    # seed 1 on the first quarter only
    same = ((n // 4 + n - n // 2) / n + (n // 4) / n) / 2
    acc = f"{100 * (n // 4) / n:.1f} ± 0.0"
    assert f"| `gmoe` | 2 | {acc} | " in text and f"| {versus} | {100 * same:.1f} % |" in text
    assert f"| `gmoe` | {acc} | 2 | {versus} |" in text  # the headline table
    assert "| `mixlora` |" not in text  # no runs: not listed
    assert "| `gmoe` | 0.30 → 0.50 | 0.50 → 0.50 | 1.0 → 1.0 | 4.000 → 4.000 |" in text   # seed 0
    assert "| `gmoe` | 2 | 0.30 → 0.60 |" in text                                       # mean over seeds
    assert "`lora` |" not in text.split("routing at injection")[1]  # no router, no routing row
    assert (tmp_path / "summary.md").read_text() == text
    assert (tmp_path / "siqa" / "routing-seed0.png").stat().st_size > 0 and "(siqa/routing-seed0.png)" in text


def test_records_of_another_split_are_refused(tmp_path):
    rows = write_jsonl(tmp_path / "siqa.jsonl", task_rows("siqa", 24))
    cfg = JobConfig(task="siqa", train_file=rows, output_dir=str(tmp_path / "out"))
    data = prepare_data(cfg)
    golds = [ex.gold for ex in data.eval]
    _record(tmp_path, cfg, data, "gmoe", 0, golds)
    _record(tmp_path, cfg, data, "lora", 0, golds)
    path = tmp_path / "siqa" / "lora" / "seed0" / "results.json"  # not the run the examples are rebuilt from
    result = json.loads(path.read_text())
    result["split"]["split_seed"] = 7
    path.write_text(json.dumps(result))
    with pytest.raises(ValueError, match="lora seed 0: its held-out part differs"):
        routing_study.main(["--root", str(tmp_path)])


def test_routing_mean_needs_every_run():
    from gmoe.finetune.report import routing_mean

    runs = [{"routing": _routing(0.3, 0.5)}, {"routing": _routing(0.2, 0.7)}]
    assert routing_mean(runs, "injection", "busiest_share") == pytest.approx(0.25)
    assert routing_mean(runs, "trained", "busiest_share") == pytest.approx(0.6)
    # a run without routing (lora) or without the field: no mean that would claim to cover it
    assert routing_mean(runs + [{"routing": None}], "trained", "busiest_share") is None
    assert routing_mean(runs, "trained", "no_such_field") is None
    assert routing_mean([], "trained", "busiest_share") is None
