"""The Hugging Face-facing API: injection per model family, losses in forward, save/load, errors."""
import os

import pytest
import torch
import torch.nn as nn

import gmoe
from gmoe import GMoEConfig, GMoEModel, get_gmoe_model
from gmoe.layers import GMoEMLP, LoRALinear
from tests.models import FAMILIES, tiny_model

SMALL = dict(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_dim=16, edge_density=0.5)


def _ids(batch=2, seq=7, vocab=64):
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    return ids, mask


def _randomize_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_injects_trains_and_starts_as_identity(family):
    base = tiny_model(family)
    ids, mask = _ids()
    with torch.no_grad():
        reference = base(input_ids=ids, attention_mask=mask).logits
    gate_ptr = base.model.layers[0].mlp.gate_proj.weight.data_ptr()
    model = get_gmoe_model(base, GMoEConfig(**SMALL))
    layers = model.gmoe_layers()
    assert len(layers) == base.config.num_hidden_layers
    assert layers[0].base_layer.gate_proj.weight.data_ptr() == gate_ptr  # a reference, not a copy
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n or "embed" in n)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    # Zero LoRA B: the only difference is w_1 + w_2 = 1 up to rounding in h_c = sum_k w_k h.
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.router_loss.ndim == 0 and out.router_loss > 0
    lm_loss = base(input_ids=ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(out.loss, lm_loss + out.router_loss)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert layers[0].experts["gate_proj"].lora_B.grad.abs().sum() > 0
    assert layers[0].router.token_weight.grad.abs().sum() > 0


def test_top1_fresh_model_is_bitwise_identical_to_base():
    base = tiny_model("llama")
    ids, mask = _ids()
    with torch.no_grad():
        reference = base(input_ids=ids, attention_mask=mask).logits
        model = get_gmoe_model(base, GMoEConfig(**{**SMALL, "top_k": 1}))
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference)


def test_save_load_round_trip_is_exact(tmp_path):
    model = get_gmoe_model(tiny_model("qwen2"), GMoEConfig(**SMALL))
    _randomize_adapters(model)
    ids, mask = _ids()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids)  # advance the expert load
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary folders left behind
    base = model.unload()
    loaded = GMoEModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, logits)
    assert torch.equal(loaded.expert_load(), model.expert_load())
    for a, b in zip(loaded.gmoe_layers(), model.gmoe_layers()):
        assert torch.equal(a.router.expert_adjacency, b.router.expert_adjacency)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="already holds GMoE"):
        GMoEModel.from_pretrained(base, tmp_path / "adapter")
    trainable = GMoEModel.from_pretrained(loaded.unload(), tmp_path / "adapter", is_trainable=True)
    assert trainable.trainable_parameters()[0] > 0


def test_interrupted_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    model.save_pretrained(tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    _randomize_adapters(model)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("gmoe.model.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_generate_with_adapters():
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    _randomize_adapters(model)
    model.eval()
    ids = torch.randint(0, 64, (1, 5))
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], ids)
    with torch.no_grad():  # greedy generation follows the adapted model's argmax
        first = model(input_ids=ids).logits[0, -1].argmax()
    assert out[0, 5] == first
    assert torch.equal(model.expert_load(), torch.zeros(2, 4))  # eval mode counts no load


def test_unload_restores_the_untouched_base():
    base = tiny_model()
    originals = {n: type(m) for n, m in base.named_modules()}
    ids, _ = _ids()
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = get_gmoe_model(base, GMoEConfig(**SMALL))
    assert any(isinstance(m, (GMoEMLP, LoRALinear)) for m in base.modules())
    restored = model.unload()
    assert restored is base
    assert {n: type(m) for n, m in restored.named_modules()} == originals
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, reference)


def test_attribute_forwarding_like_peft():
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    assert model.config.hidden_size == 32
    assert model.get_input_embeddings().weight.shape == (64, 32)
    model.print_trainable_parameters()


def test_padding_is_left_out_of_the_load():
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL)).train()
    ids, mask = _ids()
    model(input_ids=ids, attention_mask=mask, labels=ids)
    # each unpadded token adds K · (sum of its top-K probs) = K · w-mass ≤ K
    total = model.expert_load().sum(1)
    assert torch.all(total <= 2 * int(mask.sum()) + 1e-4)
    assert torch.all(total > 2 * int(mask.sum()) * 0.25)


def test_load_counted_once_with_gradient_checkpointing():
    torch.manual_seed(1)
    plain = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    _randomize_adapters(plain)
    state = {k: v.clone() for k, v in plain.adapter_state_dict().items()}
    torch.manual_seed(1)
    ckpt = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    ckpt.load_adapter_state_dict(state)
    ckpt.gradient_checkpointing_enable()
    ids, mask = _ids()
    losses = []
    for model in (plain, ckpt):
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(ckpt.expert_load(), plain.expert_load())
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_ablation_switches_and_linear_router():
    ids, mask = _ids()
    for overrides in (dict(poisson_loss_coef=0.0, normal_loss_coef=0.0),
                      dict(router="linear", aux_loss_coef=0.01)):
        model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL, **overrides)).train()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        if "router" not in overrides:
            assert out.router_loss.item() == 0.0
        else:
            assert out.router_loss.item() > 0.0
            assert isinstance(model.gmoe_layers()[0].router, gmoe.router.LinearRouter)


# ----- errors -----

def test_unsupported_model_names_class_and_supported():
    class NoGatedMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="NoGatedMLP.*Supported: Llama"):
        get_gmoe_model(NoGatedMLP(), GMoEConfig(**SMALL))


def test_target_module_matching_nothing():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no nn.Linear"):
        get_gmoe_model(tiny_model(), GMoEConfig(**SMALL, target_modules=["q_proj", "qkv_proj"]))


def test_config_type_checked():
    with pytest.raises(TypeError, match="GMoEConfig"):
        get_gmoe_model(tiny_model(), {"num_experts": 4})


def test_load_errors(tmp_path):
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    model.save_pretrained(tmp_path / "ok")
    base = model.unload()
    # shapes of another config
    other = get_gmoe_model(tiny_model(), GMoEConfig(**{**SMALL, "r": 4}))
    other.save_pretrained(tmp_path / "r4")
    cfg = (tmp_path / "r4" / "adapter_config.json").read_text().replace('"r": 4', '"r": 2')
    (tmp_path / "r4" / "adapter_config.json").write_text(cfg)
    with pytest.raises(ValueError, match=r"lora_A\S* has shape \((4, )?4, \d+\) but this model expects \((4, )?2, \d+\)"):
        GMoEModel.from_pretrained(base, tmp_path / "r4")
    # a base model with another hidden size
    with pytest.raises(ValueError, match="shape"):
        GMoEModel.from_pretrained(tiny_model(hidden=16, inter=24), tmp_path / "ok")
    # missing / corrupt weights
    (tmp_path / "ok" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        GMoEModel.from_pretrained(tiny_model(), tmp_path / "ok")
    os.remove(tmp_path / "ok" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        GMoEModel.from_pretrained(tiny_model(), tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        GMoEModel.from_pretrained(tiny_model(), tmp_path / "nowhere")


def test_wrong_input_dtype_and_device():
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    with pytest.raises(TypeError, match="integer"):
        model(input_ids=torch.rand(1, 4))
    with pytest.raises(ValueError, match="on meta but the model is on cpu"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    layer = model.gmoe_layers()[0]
    with pytest.raises(ValueError, match="hidden size 32"):
        layer(torch.randn(2, 3, 16))


def test_triton_backend_without_gpu_says_how_to_fix(monkeypatch):
    from gmoe_kernels.backend import resolve_backend
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='reference'"):
        resolve_backend("triton", torch.device("cpu"))


def test_lora_dropout_only_in_training():
    model = get_gmoe_model(tiny_model(), GMoEConfig(**{**SMALL, "lora_dropout": 0.5}))
    _randomize_adapters(model)
    ids, _ = _ids()
    model.train()
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_save_into_existing_folder_keeps_other_files(tmp_path):
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "train_log.txt").write_text("log")
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors",
                                            "checkpoint-1", "train_log.txt"]


def test_backend_is_not_part_of_the_adapter(tmp_path):
    model = get_gmoe_model(tiny_model(), GMoEConfig(**{**SMALL, "backend": "reference"}))
    model.save_pretrained(tmp_path)
    assert '"backend"' not in (tmp_path / "adapter_config.json").read_text()
    loaded = GMoEModel.from_pretrained(model.unload(), tmp_path)
    assert loaded.gmoe_config.backend == "auto"


def test_config_is_not_mutated():
    cfg = GMoEConfig(**SMALL)
    get_gmoe_model(tiny_model(), cfg)
    assert cfg.base_model_name_or_path is None


def test_return_dict_false_gives_tuple_with_loss_first():
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    ids, mask = _ids()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, return_dict=False)
    full = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], full.loss)


def test_unload_restores_requires_grad_and_retires_wrapper():
    base = tiny_model()
    base.lm_head.weight.requires_grad_(True)
    base.model.embed_tokens.weight.requires_grad_(False)
    model = get_gmoe_model(base, GMoEConfig(**SMALL))
    restored = model.unload()
    assert restored.lm_head.weight.requires_grad and not restored.model.embed_tokens.weight.requires_grad
    with pytest.raises(RuntimeError, match="unloaded"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_reentrant_checkpointing_is_refused():
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL))
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_half_precision_model_keeps_fp32_load_and_router():
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL)).to(torch.bfloat16).train()
    layer = model.gmoe_layers()[0]
    assert layer.expert_load.dtype == torch.float32
    layer.expert_load.fill_(20000.0)
    ids, mask = _ids()
    model(input_ids=ids, attention_mask=mask, labels=ids)
    assert layer.expert_load.sum() > 80000.0  # grew: a bf16 count would stay put
    assert layer.last_routing is None


def test_mismatched_mask_warns():
    model = get_gmoe_model(tiny_model(), GMoEConfig(**SMALL)).train()
    ids, _ = _ids()
    out = model(input_ids=ids, labels=ids)
    with pytest.warns(UserWarning, match="padding cannot be left out"):
        model._token_mask(torch.ones(3, 3), out.logits.new_zeros(14, 4))
