"""`lora-matched`: PEFT LoRA with as many trainable parameters as `gmoe` at the same spec."""
import copy

import pytest

from gmoe.finetune import methods as M
from models import tiny_model

pytest.importorskip("peft")


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_matched_rank_is_the_nearest_count_to_gmoe():
    base = tiny_model()
    spec = M.AdapterSpec(r=2, alpha=4.0, experts=4, top_k=2)
    target = _trainable(M.apply_method(copy.deepcopy(base), "gmoe", spec))
    matched = M.apply_method(copy.deepcopy(base), "lora-matched", spec)
    r = matched.peft_config["default"].r
    assert r > spec.r  # a mixture of 4 experts plus a router is larger than one LoRA of the same rank
    gap = abs(_trainable(matched) - target)
    for other in (r - 1, r + 1):
        import peft

        alt = peft.get_peft_model(copy.deepcopy(base), M.lora_config(spec, other))
        assert abs(_trainable(alt) - target) >= gap
    # the same scaling alpha / r as the method's own rank
    assert matched.peft_config["default"].lora_alpha / r == pytest.approx(spec.alpha / spec.r)


def test_counting_leaves_the_base_untouched():
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    M.matched_rank(base, M.AdapterSpec(r=2, alpha=4.0, experts=4, top_k=2))
    after = base.state_dict()
    assert before.keys() == after.keys()
    assert all(before[k].equal(after[k]) for k in before)
    assert not any(type(m).__name__.startswith("GMoE") for m in base.modules())
