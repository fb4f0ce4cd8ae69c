"""model.gradient_checkpointing_enable(): the same loss and gradients, and the load counted once.

Activation checkpointing re-runs each decoder layer's forward inside backward. On the CPU the
recomputed activations are bitwise those of the first run (same ops, same inputs, the RNG
state replayed for LoRA dropout), so only the order in which gradient contributions are
summed can differ: a few ulps. The tolerance below (rtol 1e-5) is 100x that, far below any
real difference (a missing router-loss gradient, a double-counted load: O(1) relative).
"""
import torch
import transformers

from gmoe import GMoEConfig, get_gmoe_model
from gmoe.layers import GMoEMLP
from gmoe.trainer import GMoETrainer
from tests.models import tiny_model

CONFIG = dict(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_dim=16, edge_density=0.5, lora_dropout=0.1)
TIGHT = dict(atol=1e-7, rtol=1e-5)


def _model(checkpointing):
    torch.manual_seed(0)
    base = tiny_model("llama")
    torch.manual_seed(1)
    model = get_gmoe_model(base, GMoEConfig(**CONFIG))
    with torch.no_grad():  # non-zero LoRA B: every adapter parameter gets a non-trivial gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def _count_layer_calls(model):
    """Calls of every GMoE layer, recomputations included. A pre-hook: a forward hook can miss the
    recompute, which non-reentrant checkpointing stops once the last saved tensor is rebuilt."""
    calls = []
    for layer in model.gmoe_layers():
        layer.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


def test_same_loss_gradients_and_load_with_checkpointing():
    ids, mask = _batch()
    results = {}
    for checkpointing in (False, True):
        model = _model(checkpointing)
        calls = _count_layer_calls(model)
        steps = []
        for _ in range(2):  # the second step's Normal loss depends on the first step's load
            torch.manual_seed(3)  # the same dropout masks in both runs
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
            load_after_forward = model.expert_load()
            out.loss.backward()
            # Backward recomputes the layers under checkpointing; the load must not move.
            assert torch.equal(model.expert_load(), load_after_forward)
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            steps.append((out.loss.detach(), out.router_loss.detach(), load_after_forward, grads))
            model.zero_grad()
        # Checkpointing really was on: every GMoE layer ran twice per step (forward, recompute).
        assert len(calls) == 2 * len(model.gmoe_layers()) * (2 if checkpointing else 1)
        results[checkpointing] = steps
    for (loss, router_loss, load, grads), (c_loss, c_router_loss, c_load, c_grads) in zip(results[False],
                                                                                        results[True]):
        torch.testing.assert_close(c_loss, loss, **TIGHT)
        torch.testing.assert_close(c_router_loss, router_loss, **TIGHT)
        assert router_loss > 0
        torch.testing.assert_close(c_load, load, **TIGHT)
        assert sorted(c_grads) == sorted(grads)
        for name in grads:
            assert grads[name].abs().sum() > 0, name  # λ, σ and the router train through the router loss
            torch.testing.assert_close(c_grads[name], grads[name], **TIGHT, msg=lambda m, n=name: f"{n}: {m}")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=9):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_trainer_gradient_checkpointing_matches_plain_training(tmp_path):
    """TrainingArguments(gradient_checkpointing=True) goes through our non-reentrant enable."""
    results = []
    for checkpointing in (False, True):
        model = _model(False)
        calls = _count_layer_calls(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)), max_steps=2, per_device_train_batch_size=4,
            learning_rate=1e-2, save_strategy="no", logging_steps=1, report_to=[], use_cpu=True,
            disable_tqdm=True, gradient_checkpointing=checkpointing, gradient_accumulation_steps=2)
        GMoETrainer(model=model, args=args, train_dataset=_Tokens()).train()
        # 2 steps x 2 micro-batches, each layer once, or twice with checkpointing
        assert len(calls) == 4 * len(model.gmoe_layers()) * (2 if checkpointing else 1)
        results.append(({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                         model.expert_load()))
    (params, load), (c_params, c_load) = results
    torch.testing.assert_close(c_load, load, **TIGHT)
    for name in params:
        torch.testing.assert_close(c_params[name], params[name], **TIGHT, msg=lambda m, n=name: f"{n}: {m}")
    assert all(isinstance(m, GMoEMLP) for m in model.gmoe_layers())
