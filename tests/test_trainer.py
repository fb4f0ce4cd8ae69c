"""transformers.Trainer runs a GMoEModel unchanged, with the router loss inside out.loss."""
import torch
import transformers

from gmoe import GMoEConfig, get_gmoe_model
from tests.models import tiny_model


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_trainer_trains_adapters_only(tmp_path):
    base = tiny_model("llama")
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_gmoe_model(base, GMoEConfig(num_experts=4, top_k=2, r=2, gcn_dim=16, edge_density=0.5))
    adapters_before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    result = trainer.train()
    assert result.global_step == 4
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(logged)))
    after = model.adapter_state_dict()
    assert not torch.equal(after["model.layers.0.mlp.experts.gate_proj.lora_B"],
                           adapters_before["model.layers.0.mlp.experts.gate_proj.lora_B"])
    assert after["model.layers.0.mlp.expert_load"].sum() > 0  # the load was counted while training
    for name, param in model.base_model.named_parameters():
        original = name.replace(".base_layer", "")
        if original in frozen_before:
            assert torch.equal(param, frozen_before[original]), name


def test_gmoe_trainer_checkpoints_are_loadable_adapters(tmp_path):
    from gmoe import GMoEModel
    from gmoe.trainer import GMoETrainer
    base = tiny_model("gemma")  # tied embeddings: a plain full-state-dict save would fail
    model = get_gmoe_model(base, GMoEConfig(num_experts=4, top_k=2, r=2, gcn_dim=16, edge_density=0.5))
    (tmp_path / "notes.txt").write_text("kept")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, gradient_accumulation_steps=2)
    trainer = GMoETrainer(model=model, args=args, train_dataset=_Tokens())
    assert trainer.model_accepts_loss_kwargs is False  # both losses averaged over accumulation alike
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert (tmp_path / "notes.txt").read_text() == "kept"
    model.eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded = GMoEModel.from_pretrained(model.unload(), checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
