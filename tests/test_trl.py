"""TRL's SFTTrainer fine-tunes a GMoEModel (gmoe.trainer.GMoESFTTrainer) with the router loss in its loss.

TRL >= 1 computes the SFT loss from its own fused LM head, never from the model's `loss`, so a
plain SFTTrainer would drop the router loss (and its fused head expects a Hugging Face model
where GMoEModel sits). Everything here is offline: a word-level tokenizer trained on the fly
and a tiny in-memory dataset.
"""
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from gmoe import GMoEConfig, GMoEModel, get_gmoe_model  # noqa: E402
from gmoe.trainer import GMoESFTTrainer  # noqa: E402
from tests.models import tiny_model  # noqa: E402

WORDS = "the cat sat on a mat and dog ran to big red ball".split()
CONFIG = dict(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_dim=16, edge_density=0.5)


def _texts(n=16):
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n_words),), generator=g).tolist())
            for n_words in torch.randint(4, 10, (n,), generator=g)]  # unequal lengths: padding in every batch


def _tokenizer(texts):
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<unk>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def _train(out_dir, max_steps, save_steps=None, callbacks=(), resume=None, init_seed=0, **overrides):
    texts = _texts()
    torch.manual_seed(0)
    base = tiny_model("llama")
    torch.manual_seed(init_seed)
    model = get_gmoe_model(base, GMoEConfig(**{**CONFIG, **overrides}))
    calls = []  # forwards of the whole model (SFTConfig turns activation checkpointing on: layers run twice)
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    args = trl.SFTConfig(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, max_length=16, bf16=False, seed=3,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    trainer = GMoESFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=_tokenizer(texts), callbacks=list(callbacks))
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    trainer.train(resume_from_checkpoint=resume)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return model, before, logs, calls


def test_sft_trainer_trains_with_the_router_loss(tmp_path):
    model, before, logs, calls = _train(tmp_path / "gmoe", max_steps=3, save_steps=3)
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor([h["loss"] for h in logs])))
    assert all(h["router_loss"] > 0 for h in logs)
    # One forward per batch (TRL's metrics come from the same forward): the load counts once per step.
    assert len(calls) == 3
    after = model.adapter_state_dict()
    router = "model.layers.0.mlp.router."
    # λ and σ enter the router loss only: they move only if the optimised loss contains it.
    for key in (router + "poisson_rate", router + "normal_std", router + "token_weight",
                "model.layers.0.mlp.experts.gate_proj.lora_B"):
        assert not torch.equal(after[key], before[key]), key
    assert after["model.layers.0.mlp.expert_load"].sum() > 0
    # The checkpoint is a GMoE adapter folder that loads back.
    checkpoint = tmp_path / "gmoe" / "checkpoint-3"
    loaded = GMoEModel.from_pretrained(tiny_model("llama"), checkpoint)
    assert torch.equal(loaded.expert_load(), model.expert_load())

    # Same initialisation and first batch without router losses: the first loss is lower by exactly
    # that step's router loss (TRL's LM loss is identical up to fp32 summation order).
    _, _, plain_logs, _ = _train(tmp_path / "plain", max_steps=1, poisson_loss_coef=0.0, normal_loss_coef=0.0)
    assert "router_loss" not in plain_logs[0] or plain_logs[0]["router_loss"] == 0.0
    torch.testing.assert_close(torch.tensor(logs[0]["loss"] - logs[0]["router_loss"]),
                               torch.tensor(plain_logs[0]["loss"]), atol=1e-4, rtol=1e-5)


def test_sft_trainer_resumes_bitwise(tmp_path):
    from tests.test_resume import _StopAt
    straight, _, logs, _ = _train(tmp_path / "straight", max_steps=3)
    _train(tmp_path / "run", max_steps=3, save_steps=500, callbacks=[_StopAt(2)])
    resumed, _, resumed_logs, _ = _train(tmp_path / "run", max_steps=3, init_seed=5,
                                         resume=str(tmp_path / "run" / "checkpoint-2"))
    assert [h["loss"] for h in resumed_logs] == [h["loss"] for h in logs]
    expected = straight.adapter_state_dict()
    for key, value in resumed.adapter_state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_sft_trainer_refuses_a_second_forward_per_batch(tmp_path):
    texts = _texts()
    model = get_gmoe_model(tiny_model("llama"), GMoEConfig(**CONFIG))
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, bf16=False,
                         label_smoothing_factor=0.1, save_strategy="no")
    with pytest.raises(ValueError, match="count the expert load twice"):
        GMoESFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                       processing_class=_tokenizer(texts))
