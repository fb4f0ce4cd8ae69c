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
    summary = {"busiest_share": busiest_before, "top_set_fraction": 0.5, "idle_experts": 1.0, "normal_std": 4.0,
               "effective_experts": 1.9}
    return {"injection": {"summary": summary},
            "trained": {"summary": {**summary, "busiest_share": busiest_after, "effective_experts": 1.5}}}


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
    lora_c = [[1.0] * (n // 2) + [0.0] * (n - n // 2), [1.0] * n]   # per seed; seed 1 right everywhere
    gain_d = [[x - z for x, z in zip(row, zero_c)] for row in lora_c]
    gain = statistics.fmean(x for row in gain_d for x in row)
    gain_se, _ = routing_study.two_level_se(gain_d)  # (checked against a hand computation below)
    assert (f"| `lora` | 2 | {100 * statistics.fmean(lora):.1f} ± {100 * statistics.stdev(lora):.1f} "
            f"| {100 * gain:+.1f} (SE {100 * gain_se:.2f}) | – | – |") in text
    # gmoe is right on the first quarter in both seeds
    gmoe_c = [1.0] * (n // 4) + [0.0] * (n - n // 4)
    d = [[g - x for g, x in zip(gmoe_c, row)] for row in lora_c]
    se, _ = routing_study.two_level_se(d)
    # the seeds disagree (lora's seed 1 is right everywhere): the SE is larger than over examples alone
    averaged = [statistics.fmean(col) for col in zip(*d)]
    assert se > statistics.stdev(averaged) / math.sqrt(n)
    versus = f"{100 * statistics.fmean(averaged):+.1f} (SE {100 * se:.2f}) [2 shared seeds]"
    # same answer as lora's run of the same seed: seed 0 on the first quarter and the wrong second half,
    # seed 1 on the first quarter only
    same = ((n // 4 + n - n // 2) / n + (n // 4) / n) / 2
    acc = f"{100 * (n // 4) / n:.1f} ± 0.0"
    assert f"| `gmoe` | 2 | {acc} | " in text and f"| {versus} | {100 * same:.1f} % |" in text
    assert f"| `gmoe` | {acc} | 2 | {versus} |" in text  # the headline table
    assert "| `mixlora` |" not in text  # no runs: not listed
    assert "| `gmoe` | 0.30 → 0.50 | 0.50 → 0.50 | 1.0 → 1.0 | 1.90 → 1.50 | 4.000 → 4.000 |" in text   # seed 0
    assert "uniform routing puts 1/C(8, 2) = 0.036 of the tokens on any one top-K set" in text
    assert "| `gmoe` | 2 | 0.30 → 0.60 | 0.50 → 0.50 | 1.0 → 1.0 | 1.90 → 1.50 |" in text
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


def test_two_level_se_by_hand():
    """d = [[1, 0, 1, 0], [1, 1, 1, 1]]: grand mean 0.75, seed means 0.5 and 1, example means 1, 0.5, 1, 0.5;
    MS_seed = 4 (0.25² + 0.25²) / 1 = 0.5, MS_example = 2 · 4 · 0.25² / 3 = 1/6, every residual ±0.25 so
    MS_residual = 8 · 0.25² / 3 = 1/6. σ²_seed = (0.5 − 1/6) / 4 = 1/12, σ²_example = 0, σ²_residual = 1/6:
    variance = (1/12)/2 + 0 + (1/6)/8 = 1/24 + 1/48 = 1/16, SE 0.25, of which the seeds give 2/3.
    Over examples alone (the seed-averaged d: 1, 0.5, 1, 0.5) it would be sqrt(1/12)/2 = 0.144."""
    se, seed_share = routing_study.two_level_se([[1, 0, 1, 0], [1, 1, 1, 1]])
    assert se == pytest.approx(0.25) and seed_share == pytest.approx(2 / 3)
    # one seed: the standard error over examples, sd/√n
    assert routing_study.two_level_se([[1, 0, 1, 0]]) == (pytest.approx(math.sqrt(1 / 3) / 2), 0.0)
    # identical seeds: no seed part, and the SE over examples of one of them (residual 0)
    se, seed_share = routing_study.two_level_se([[1, 0, 0, 1, 1], [1, 0, 0, 1, 1]])
    assert seed_share == 0.0 and se == pytest.approx(statistics.stdev([1, 0, 0, 1, 1]) / math.sqrt(5))


def test_two_level_se_covers_the_simulated_variance():
    """d = μ + a_s + b_i + e (σ_a 0.03, σ_b 0.3, σ_e 0.4; 3 seeds × 300 examples): the mean's true
    variance is σ_a²/3 + σ_b²/300 + σ_e²/900; the estimate averages near it over 300 replications,
    where the examples-only SE falls short by the seed part."""
    import random

    rng = random.Random(0)
    seeds, n, reps = 3, 300, 300
    truth = 0.03 ** 2 / seeds + 0.3 ** 2 / n + 0.4 ** 2 / (seeds * n)
    estimates, examples_only = [], []
    for _ in range(reps):
        a = [rng.gauss(0, 0.03) for _ in range(seeds)]
        b = [rng.gauss(0, 0.3) for _ in range(n)]
        d = [[a[s] + b[i] + rng.gauss(0, 0.4) for i in range(n)] for s in range(seeds)]
        estimates.append(routing_study.two_level_se(d)[0] ** 2)
        averaged = [statistics.fmean(col) for col in zip(*d)]
        examples_only.append(statistics.variance(averaged) / n)
    assert statistics.fmean(estimates) == pytest.approx(truth, rel=0.15)
    assert statistics.fmean(examples_only) < 0.75 * truth


def test_routing_table_drops_a_field_no_record_has():
    """Records from before the effective experts were counted: no such column (not a column of "–")."""
    old = _routing(0.3, 0.5)
    for when in ("injection", "trained"):
        del old[when]["summary"]["effective_experts"]
    results = [{"seed": 0, "routing": old, "config": {"experts": 8, "top_k": 2}}]
    lines = routing_study.routing_table("siqa", {"gmoe": results}, seed=0)
    assert "| method | busiest expert | top-K set | idle experts | σ |" in lines
    assert "| `gmoe` † | 0.30 → 0.50 | 0.50 → 0.50 | 1.0 → 1.0 | 4.000 → 4.000 |" in lines
