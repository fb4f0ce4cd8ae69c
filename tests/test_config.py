"""GMoEConfig validation and its JSON round trip."""
import json

import pytest

from gmoe import GMoEConfig

BAD = [
    ("top_k", dict(num_experts=4, top_k=5), "num_experts"),
    ("r", dict(r=0), ">= 1"),
    ("edge_density", dict(edge_density=1.5), r"\[0.0, 1.0\]"),
    ("edge_density", dict(edge_density=-0.1), r"\[0.0, 1.0\]"),
    ("router", dict(router="mlp"), "graph"),
    ("backend", dict(backend="cuda"), "reference"),
    ("lora_dropout", dict(lora_dropout=1.0), r"\[0, 1\)"),
    ("lora_alpha", dict(lora_alpha=0), "lora_alpha"),
    ("num_experts", dict(num_experts=0), "num_experts"),
    ("gcn_layers", dict(gcn_layers=0), "gcn_layers"),
    ("poisson_loss_coef", dict(poisson_loss_coef=-1.0), "poisson_loss_coef"),
    ("expert_modules", dict(expert_modules=["fc1"]), "subset"),
    ("target_modules", dict(target_modules="q_proj"), "list"),
    ("target_modules", dict(target_modules=["gate_proj"]), "expert_modules"),
    ("num_experts", dict(num_experts=2.5), "int"),
]


@pytest.mark.parametrize("field,kwargs,allowed", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_invalid_values_name_field_value_and_allowed(field, kwargs, allowed):
    with pytest.raises(ValueError, match=allowed) as info:
        GMoEConfig(**kwargs)
    message = str(info.value)
    assert f"GMoEConfig.{field}=" in message
    assert repr(kwargs[field]) in message


def test_round_trip_through_adapter_config(tmp_path):
    cfg = GMoEConfig(num_experts=6, top_k=3, r=4, lora_alpha=8, router="linear", aux_loss_coef=0.01,
                     target_modules=["q_proj"], base_model_name_or_path="tiny-llama")
    cfg.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "GMOE" and data["format_version"] == 3
    assert data["base_model_name_or_path"] == "tiny-llama"
    assert GMoEConfig.load(tmp_path) == cfg


def test_other_peft_type_is_rejected(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="not a GMoE adapter"):
        GMoEConfig.load(tmp_path)


def test_unknown_field_is_rejected(tmp_path):
    data = GMoEConfig().to_dict()
    data["num_expert"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_expert"):
        GMoEConfig.load(tmp_path)


def test_corrupt_json_is_reported(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GMoEConfig.load(tmp_path)


def test_scaling_is_alpha_over_r():
    assert GMoEConfig(r=2, lora_alpha=4).scaling == 2.0
