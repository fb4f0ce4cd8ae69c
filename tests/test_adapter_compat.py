"""An adapter saved by the release that wrote adapter format 1 loads and computes the same logits.

tests/data/adapter-format-1 was written by that release's `save_pretrained` (a tiny Llama from
`tests.models.tiny_model` seeded 0, a graph-router GMoE with every trainable tensor and the load
made non-zero), with the logits it gave for fixed token ids (`expected.pt`).
"""
from pathlib import Path

import torch

import gmoe
from tests.models import tiny_model

ADAPTER = Path(__file__).parent / "data" / "adapter-format-1"


def _base():
    torch.manual_seed(0)
    return tiny_model("llama", hidden=32, inter=48, layers=2)


def test_format_1_adapter_loads_with_the_published_defaults_and_the_same_logits(tmp_path):
    model = gmoe.GMoEModel.from_pretrained(_base(), ADAPTER)
    cfg = model.gmoe_config
    assert (cfg.token_coupling, cfg.load_decay, cfg.freeze_loss_params) == ("degree", 1.0, False)
    expected = torch.load(ADAPTER / "expected.pt")
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    # fp32 on a 2-layer model: rounding differences across BLAS builds stay far below 1e-4
    assert torch.allclose(logits, expected["logits"], atol=1e-4, rtol=1e-4)
    assert model.expert_load().abs().sum() > 0
    # saved again, it is the current format (3) and loads to the same adapter
    model.save_pretrained(tmp_path)
    assert '"format_version": 3' in (tmp_path / "adapter_config.json").read_text()
    again = gmoe.GMoEModel.from_pretrained(_base(), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.adapter_state_dict().values(),
                                                 again.adapter_state_dict().values()))
