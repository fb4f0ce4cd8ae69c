"""Routing telemetry against a brute-force count of the routing each GMoE layer produced."""
import collections
import math

import pytest
import torch

import gmoe
from gmoe import telemetry
from gmoe.layers import GMoEMLP
from tests.models import tiny_model


def _model(num_experts=4, top_k=2, router="graph"):
    torch.manual_seed(0)
    config = gmoe.GMoEConfig(num_experts=num_experts, top_k=top_k, gcn_dim=16, edge_density=0.5, router=router)
    return gmoe.get_gmoe_model(tiny_model("llama", hidden=32, inter=48, layers=2), config)


def _capture(model):
    """Per layer, the list of (probs, indices, weights) of every forward (read right after the layer ran)."""
    seen = collections.defaultdict(list)
    for i, layer in enumerate(model.gmoe_layers()):
        layer.register_forward_hook(lambda m, a, o, i=i: seen[i].append(tuple(t.detach() for t in m.last_routing)))
    return seen


def _batch(seed, padded=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        mask[2, 5:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _brute_force(calls, masks, num_experts):
    """Slot and mass counts, set counts and tokens of one layer over its forwards, in plain Python."""
    slots, mass, sets, tokens = [0.0] * num_experts, [0.0] * num_experts, collections.Counter(), 0
    for (probs, indices, _), mask in zip(calls, masks):
        for t, keep in enumerate(mask.reshape(-1).tolist()):
            if not keep:
                continue
            tokens += 1
            chosen = indices[t].tolist()
            sets[tuple(sorted(chosen))] += 1
            for e in chosen:
                slots[e] += 1
                mass[e] += probs[t, e].item()
    return slots, mass, sets, tokens


def _brute_force_effective(calls, masks):
    """The mean over non-padding tokens of 1 / Σ_k w_k², one token at a time."""
    values = [1.0 / sum(w * w for w in weights[t].tolist())
              for (_, _, weights), mask in zip(calls, masks)
              for t, keep in enumerate(mask.reshape(-1).tolist()) if keep]
    return sum(values) / len(values)


def _share(counts):
    return [c / sum(counts) for c in counts]


def test_training_window_matches_brute_force():
    model = _model().train()
    seen = _capture(model)
    batches = [_batch(1), _batch(2)]
    for batch in batches:
        model(**batch).loss.backward()
    stats = model.routing_stats()
    assert stats.tokens == sum(int(b["attention_mask"].sum()) for b in batches) and stats.exact_sets
    for i, layer in enumerate(stats.layers):
        slots, mass, sets, tokens = _brute_force(seen[i], [b["attention_mask"] for b in batches], 4)
        assert layer.tokens == tokens
        assert layer.slot_share == pytest.approx(_share(slots), abs=1e-6)
        assert layer.mass_share == pytest.approx(_share(mass), abs=1e-6)
        assert layer.busiest_share == pytest.approx(max(_share(slots)), abs=1e-6)
        assert layer.top_set_fraction == pytest.approx(max(sets.values()) / tokens, abs=1e-6)
        entropy = -sum(p * math.log(p) for p in _share(slots) if p > 0) / math.log(4)
        assert layer.load_entropy == pytest.approx(entropy, abs=1e-6)
        assert layer.idle_experts == sum(s < 1 / 16 for s in _share(slots))
        assert layer.normal_std == 2.0 and layer.poisson_rate == 1.5
        assert layer.effective_experts == pytest.approx(
            _brute_force_effective(seen[i], [b["attention_mask"] for b in batches]), abs=1e-6)
    # reading resets the window; an eval forward outside measuring_routing() does not count
    model.eval()
    with torch.no_grad():
        model(**_batch(3))
    assert model.routing_stats().tokens == 0


def test_measuring_routing_counts_eval_forwards_only_inside():
    model = _model().eval()
    seen = _capture(model)
    batch = _batch(4)
    with torch.no_grad():
        model(**batch)  # outside: not counted
        with model.measuring_routing():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            stats = model.routing_stats()
    assert model.routing_stats().tokens == 0  # leaving the context starts a new window
    slots, _, _, tokens = _brute_force(seen[0][1:], [batch["attention_mask"]], 4)
    assert stats.tokens == tokens and stats.layers[0].slot_share == pytest.approx(_share(slots), abs=1e-6)
    assert stats.layers[0].effective_experts == pytest.approx(
        _brute_force_effective(seen[0][1:], [batch["attention_mask"]]), abs=1e-6)


def test_many_sets_are_hashed_and_bound_the_exact_fraction():
    """C(16, 8) = 12870 possible sets exceed MAX_SETS: counted in hashed buckets, an upper bound."""
    assert math.comb(16, 8) > telemetry.MAX_SETS
    model = _model(num_experts=16, top_k=8).train()
    seen = _capture(model)
    batch = _batch(5)
    model(**batch).loss.backward()
    stats = model.routing_stats()
    assert not stats.exact_sets
    for i, layer in enumerate(stats.layers):
        _, _, sets, tokens = _brute_force(seen[i], [batch["attention_mask"]], 16)
        assert layer.top_set_fraction >= max(sets.values()) / tokens - 1e-9


def test_set_rank_is_a_bijection():
    """The combinatorial rank maps the C(E, K) sorted sets onto 0..C(E, K)-1 (exact set counts)."""
    import itertools
    digits = telemetry.set_digits(7, 3)
    ranks = sorted(int(sum(digits[c, k] for k, c in enumerate(s))) for s in itertools.combinations(range(7), 3))
    assert ranks == list(range(math.comb(7, 3)))


def test_linear_router_has_no_loss_parameters_or_degrees():
    model = gmoe.get_gmoe_model(tiny_model("llama", hidden=32, inter=48, layers=2),
                                gmoe.GMoEConfig(num_experts=4, router="linear", poisson_loss_coef=0.0,
                                                normal_loss_coef=0.0, aux_loss_coef=0.01)).train()
    model(**_batch(6)).loss.backward()
    summary = model.routing_stats().summary()
    assert summary["normal_std"] is None and summary["degree_correlation"] is None and summary["tokens"] > 0


def test_window_stays_fp32_and_out_of_the_adapter(tmp_path):
    model = _model().to(torch.bfloat16)
    layer = model.gmoe_layers()[0]
    assert all(getattr(layer, n).dtype == torch.float32 for n in (*telemetry.COUNT_NAMES, "routing_tokens"))
    assert not any("routing_" in key for key in model.adapter_state_dict())
    assert isinstance(layer, GMoEMLP)


def test_rank_correlation():
    assert telemetry.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert telemetry.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert telemetry.rank_correlation([1, 1, 1], [1, 2, 3]) is None
    # ties take their mean rank: ranks (0.5, 0.5, 2) against (0, 1, 2)
    assert telemetry.rank_correlation([5, 5, 9], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)


def test_effective_experts_bounds_and_a_hand_value():
    """1/Σ_k w_k²: K for equal weights, 1 for one weight, 1/(0.8² + 0.2²) = 1.4706 in between;
    a padding token (mask 0) does not count."""
    indices = torch.tensor([[[0, 1], [2, 3], [1, 2], [0, 3]]])                   # (L 1, T 4, K 2)
    weights = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.8, 0.2], [0.9, 0.1]]])
    mask = torch.tensor([True, True, True, False])
    counts = telemetry.batch_counts(indices, weights, mask, telemetry.set_digits(4, 2), 6)
    assert counts["routing_effective"].shape == (1, 1)
    assert counts["routing_effective"].item() == pytest.approx(2.0 + 1.0 + 1 / 0.68, abs=1e-5)
    row = telemetry.layer_routing("l", [2, 2, 2, 0], [1, 1, 1, 0], [1, 1, 1, 0, 0, 0], 3, None,
                                  counts["routing_effective"].item())
    assert row.effective_experts == pytest.approx((3.0 + 1 / 0.68) / 3, abs=1e-5)


def test_compare_table_shows_effective_experts_and_old_records_still_read():
    """The compare table's effective-experts column (mean over seeds, injection → trained); a run
    recorded before the field existed makes it "–" rather than a mean over the others."""
    from gmoe.finetune import report
    from gmoe.finetune.routing import _format

    def run(seed, before, after):
        routing = {w: {"summary": {"busiest_share": 0.3, "top_set_fraction": 0.5, "effective_experts": v}}
                   for w, v in (("injection", before), ("trained", after))}
        return {"seed": seed, "finetuned": {"acc": 0.5, "acc_norm": 0.5, "tokens_per_s": 1.0},
                "train": {"tokens_per_s": 1.0, "seconds": 1.0}, "trainable_params": {"trainable": 10},
                "routing": routing}
    zero_shot = {"acc": 0.4, "acc_norm": 0.4, "n": 100}
    table = report.markdown_table(report.summarize("t", zero_shot, {"gmoe": [run(0, 1.9, 1.5), run(1, 1.7, 1.3)]}), "")
    assert "| effective experts |" in table and "| 1.80 → 1.40 |" in table
    old = run(2, None, None)
    table = report.markdown_table(report.summarize("t", zero_shot, {"gmoe": [run(0, 1.9, 1.5), old]}), "")
    assert "| 0.30 → 0.30 | 0.50 → 0.50 | – |" in table
    layer = dict(name="l", tokens=4, slot_share=[0.5, 0.5], mass_share=[0.5, 0.5], busiest_share=0.5,
                 load_entropy=1.0, top_set_fraction=1.0, idle_experts=0, poisson_rate=None, normal_std=None,
                 degree_correlation=None)  # a layer record without effective_experts
    text = _format({"num_experts": 2, "top_k": 1, "tokens": 4, "exact_sets": True, "layers": [layer]})
    assert "eff." in text and "–" in text
