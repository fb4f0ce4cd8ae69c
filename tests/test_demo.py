"""The demo's training loop lowers the loss and counts the expert load (a short run)."""
import torch

from gmoe import GMoEConfig, get_gmoe_model
from examples.train_tiny import byte_batches, format_load, main, tiny_llama, train_loop


def test_short_training_lowers_lm_loss():
    model = get_gmoe_model(tiny_llama(hidden_size=32, intermediate_size=64),
                           GMoEConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, gcn_dim=16, edge_density=0.5))
    batches = byte_batches("abcabcabd " * 40, 16, 8, torch.Generator().manual_seed(0))
    history = train_loop(model, batches, steps=60, lr=5e-3, log=lambda line: None)
    lm = [loss - router for loss, router in history]
    assert sum(lm[-5:]) / 5 < sum(lm[:5]) / 5 - 0.3
    assert model.expert_load().sum() > 0
    assert "layer 1" in format_load(model)


def test_cli_rejects_missing_text(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit):
        main(["--text", str(tmp_path / "missing.txt")])
    assert "does not exist" in capsys.readouterr().err
