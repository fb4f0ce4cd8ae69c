"""Resuming GMoETrainer from a checkpoint continues the run exactly, and reruns are reproducible.

Bitwise comparisons are right here: both runs execute the same ops in the same order on the
same machine and thread count, so any difference means state was lost or restored wrongly
(adapters, λ/σ, running load, optimizer moments, scheduler, RNG for LoRA dropout, data order).
"""
import pytest
import torch
import transformers

from gmoe import GMoEConfig, get_gmoe_model
from gmoe.trainer import GMoETrainer
from tests.models import tiny_model

CONFIG = dict(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_dim=16, edge_density=0.5,
              lora_dropout=0.1)  # dropout: the resumed run must also get the RNG state back
TOTAL = 6  # optimizer steps; an epoch is 3


class _Tokens(torch.utils.data.Dataset):
    """Random token rows; every other row is left-padded (padding is out of loss and load)."""

    def __init__(self, n=12, seq=10, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids, mask = self.ids[i], torch.ones_like(self.ids[i])
        if i % 2:
            mask[:3] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class _StopAt(transformers.TrainerCallback):
    """Stop training after `step` optimizer steps (an interrupted job), saving a checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def _trainer(out_dir, init_seed, callbacks=()):
    torch.manual_seed(0)
    base = tiny_model("llama")  # the same pretrained base in every run
    torch.manual_seed(init_seed)
    model = get_gmoe_model(base, GMoEConfig(**CONFIG))
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=TOTAL, per_device_train_batch_size=4, learning_rate=1e-2,
        warmup_steps=2, lr_scheduler_type="linear", weight_decay=0.01, save_strategy="no", logging_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=7, gradient_accumulation_steps=1)
    return GMoETrainer(model=model, args=args, train_dataset=_Tokens(), callbacks=list(callbacks))


def _state(trainer):
    model = trainer.model
    adapters = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    optimizer = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            for key, value in trainer.optimizer.state[p].items():
                optimizer[f"{names[id(p)]}.{key}"] = value.clone()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return adapters, optimizer, trainer.lr_scheduler.get_last_lr(), losses


def _assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


@pytest.mark.parametrize("stop", [2, 3], ids=["mid-epoch", "epoch-end"])  # Trainer resumes these differently
def test_resume_matches_an_uninterrupted_run_bitwise(tmp_path, stop):
    straight = _trainer(tmp_path / "straight", init_seed=0)
    straight.train()
    adapters, optimizer, lr, losses = _state(straight)

    interrupted = _trainer(tmp_path / "run", init_seed=0, callbacks=[_StopAt(stop)])
    interrupted.train()
    assert interrupted.state.global_step == stop
    checkpoint = tmp_path / "run" / f"checkpoint-{stop}"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()

    # Another initialisation: only what the checkpoint restores can make the runs agree.
    resumed = _trainer(tmp_path / "run", init_seed=123)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == TOTAL
    r_adapters, r_optimizer, r_lr, r_losses = _state(resumed)

    router = "model.layers.0.mlp.router."
    assert {router + "poisson_rate", router + "normal_std", "model.layers.0.mlp.expert_load"} <= set(adapters)
    assert (adapters[router + "normal_std"] != CONFIG["num_experts"] / 2).all()  # σ trained (init E/2)
    _assert_same_tensors(r_adapters, adapters)  # adapters, λ, σ, graph and running load
    _assert_same_tensors(r_optimizer, optimizer)  # AdamW moments and step counts
    assert r_lr == lr
    assert r_losses == losses  # the resumed steps saw the same batches and dropout masks


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    interrupted = _trainer(tmp_path / "run", init_seed=0, callbacks=[_StopAt(1)])
    interrupted.train()
    torch.manual_seed(0)
    other = get_gmoe_model(tiny_model("llama"), GMoEConfig(**{**CONFIG, "top_k": 1}))
    trainer = GMoETrainer(model=other, args=interrupted.args, train_dataset=_Tokens())
    before = {k: v.clone() for k, v in other.adapter_state_dict().items()}
    with pytest.raises(ValueError, match=r"another GMoE config: top_k=2 \(this model: 1\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    _assert_same_tensors(other.adapter_state_dict(), before)


def test_same_seed_gives_bitwise_identical_adapters(tmp_path):
    first = _trainer(tmp_path / "a", init_seed=0)
    first.train()
    second = _trainer(tmp_path / "b", init_seed=0)
    second.train()
    _assert_same_tensors(second.model.adapter_state_dict(), first.model.adapter_state_dict())
    # and the run did something: a different seed gives different adapters
    third = _trainer(tmp_path / "c", init_seed=1)
    assert not torch.equal(third.model.adapter_state_dict()["model.layers.0.mlp.router.token_weight"],
                           first.model.adapter_state_dict()["model.layers.0.mlp.router.token_weight"])


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    from safetensors.torch import load_file
    torch.manual_seed(0)
    model = get_gmoe_model(tiny_model("llama"), GMoEConfig(**CONFIG))
    # "best" = the highest eval loss, so that the best checkpoint is an early one, not the final state
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = GMoETrainer(model=model, args=args, train_dataset=_Tokens(), eval_dataset=_Tokens(n=4))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")
    _assert_same_tensors(model.adapter_state_dict(), load_file(f"{best}/adapter_model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"))
    assert not torch.equal(last["model.layers.0.mlp.experts.gate_proj.lora_B"],
                           model.adapter_state_dict()["model.layers.0.mlp.experts.gate_proj.lora_B"])


def test_checkpoint_with_0dim_lambda_sigma_of_older_adapters_loads(tmp_path):
    """Adapters of gmoe-kernels 0.1.0 hold λ and σ 0-dim; they are (1,) now."""
    from safetensors.torch import load_file, save_file

    from gmoe.trainer import load_checkpoint_adapter
    torch.manual_seed(0)
    model = get_gmoe_model(tiny_model("llama"), GMoEConfig(**CONFIG))
    with torch.no_grad():
        for layer in model.gmoe_layers():
            layer.router.poisson_rate.fill_(1.75)
            layer.router.normal_std.fill_(3.0)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    state = {k: v.reshape(()) if k.endswith(("poisson_rate", "normal_std")) else v for k, v in state.items()}
    save_file(state, path)
    with torch.no_grad():
        for layer in model.gmoe_layers():
            layer.router.poisson_rate.fill_(1.5)
            layer.router.normal_std.fill_(2.0)
    load_checkpoint_adapter(model, tmp_path)
    for layer in model.gmoe_layers():
        assert layer.router.poisson_rate.shape == (1,) and layer.router.poisson_rate.item() == 1.75
        assert layer.router.normal_std.item() == 3.0
