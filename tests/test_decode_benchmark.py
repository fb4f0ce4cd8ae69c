"""The decode benchmark's machinery (benchmarks/contenders/decode.py) on a tiny model: every
contender builds and decodes, the step clock counts the decode steps, the path switches work,
the greedy-identity check runs, and the verdict and the plot read the rows."""
import pytest
import torch

from benchmarks.contenders import decode
from tests.models import tiny_model

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    settings = decode.DecodeSettings(rank=2, experts=4, top_k=2)
    return decode.build_models(tiny_model("llama"), settings, (*decode.DECODE_IMPLS, *decode.DECODE_EXTRA_IMPLS))


def test_every_contender_decodes_and_is_timed(models):
    ids = torch.randint(1, 64, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    rates = decode.decode_rates(models, ids, mask, new=4, rounds=1)
    assert set(rates) == set(decode.DECODE_IMPLS) | set(decode.DECODE_EXTRA_IMPLS)
    assert all(rate > 0 and 0.0 <= busy <= 1.0 for rate, busy in rates.values())
    clock = decode._StepClock()
    decode._generate(models["gmoe-graph"], ids, mask, 4, clock)
    assert len(clock.stamps) == 4   # one stamp per new token: 3 decode steps after the prefill
    # the switched variant runs the same model with the paths off, and gives them back on
    plan = models["gmoe-graph-uncached"]
    assert plan.model is models["gmoe-graph"]
    plan.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert models["gmoe-graph"].router_cache is True


def test_greedy_identity_check(models):
    ids = torch.randint(1, 64, (3, 4))
    check = decode.greedy_identity(models["gmoe-linear"], ids, torch.ones_like(ids), new=3)
    assert check["tokens"] == 9 and check["identical"] == (check["differing"] == 0)


def test_verdict_and_plot_read_the_rows(tmp_path):
    rows = [decode._row("m@1t", impl, mode, 1, tokens_per_s=tps, ms=1.0)
            for impl, tps in (("peft-lora", 10.0), ("gmoe-graph", 8.0), ("gmoe-linear", 9.6), ("base", 12.0))
            for mode in ("prefill", "decode-b1")]
    for row in rows:   # run.py's report.add_ratios: ms over PEFT's ms
        row["ms"] = 1.0 / row["tokens_per_s"]
        row["ratio_peft"] = row["ms"] / (1.0 / 10.0)
    lines = decode.verdict(rows)
    assert any("decode-b1: gmoe-graph at 0.80x" in line and "missed by 11 %" in line for line in lines)
    assert any("decode-b1: gmoe-linear at 0.96x" in line and line.endswith(": met") for line in lines)
    stamp = {"device_name": "cpu", "dtype": "float32", "date": "2026-12-07T00:00:00"}
    path = decode.plot(rows, tmp_path / "decode.png", stamp)
    assert (tmp_path / "decode.png").stat().st_size > 1000 and path.endswith("decode.png")


@pytest.mark.slow
def test_compiled_decoding_is_timed_for_each_contender(models):
    """The compiled static-cache step (inductor on the CPU; the slow part is its C++ compile)."""
    torch._dynamo.reset()
    chosen = {name: models[name] for name in ("peft-lora", "gmoe-graph")}
    rates = decode.compiled_rates(chosen, torch.randint(1, 64, (1, 5)), new=3, rounds=1)
    assert set(rates) == set(chosen)
    assert all(rate > 0 and 0.0 <= busy <= 1.0 for rate, busy in rates.values())
