"""PEFT-grade integration: dtype policy, autocast, hooked and quantized bases, disable/merge,
zero loss coefficients, non-finite activations. Tiny Llamas built from configs (no download)."""
import warnings

import pytest
import torch
import torch.nn as nn

import gmoe
from gmoe.layers import GMoEMLP, LoRALinear
from tests.models import tiny_model
from tests.tolerances import assert_close

CFG = dict(num_experts=4, top_k=2, r=2, gcn_dim=8, edge_density=0.5)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = gmoe.get_gmoe_model(tiny_model("llama"), gmoe.GMoEConfig(**{**CFG, **overrides}))
    with torch.no_grad():  # B starts at zero: make every adapter matter
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def _batch(batch=2, seq=6, vocab=64, seed=1):
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def _router_tensors(model):
    for layer in model.gmoe_layers():
        yield from layer.router.named_parameters()
        yield from layer.router.named_buffers()
        yield "expert_load", layer.expert_load


@pytest.mark.parametrize("cast", ["to_bf16", "half", "bfloat16"])
def test_router_and_loss_state_stay_fp32_under_half_casts(cast):
    model = _model()
    model = model.to(torch.bfloat16) if cast == "to_bf16" else getattr(model, cast)()
    for name, tensor in _router_tensors(model):
        if tensor.dtype.is_floating_point:
            assert tensor.dtype == torch.float32, name
    half = torch.float16 if cast == "half" else torch.bfloat16
    assert model.gmoe_layers()[0].experts["gate_proj"].lora_A.dtype == half  # adapters follow .to()
    if cast != "half":  # fp16 matmuls are not implemented on every CPU build; bf16 are
        model.train()
        out = model(**_batch())
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert all(layer.router.token_weight.grad.dtype == torch.float32 for layer in model.gmoe_layers())


def test_double_keeps_the_router_in_fp64():
    model = _model().double()
    assert all(t.dtype == torch.float64 for _, t in _router_tensors(model) if t.dtype.is_floating_point)


@pytest.mark.parametrize("policy,expected", [("float32", torch.float32), ("base", torch.bfloat16)])
def test_adapter_dtype_policy_on_a_bf16_base(policy, expected):
    torch.manual_seed(0)
    model = gmoe.get_gmoe_model(tiny_model("llama").to(torch.bfloat16),
                                gmoe.GMoEConfig(**CFG, adapter_dtype=policy))
    layer = model.gmoe_layers()[0]
    assert layer.experts["gate_proj"].lora_A.dtype == expected
    attention = next(m for m in model.modules() if isinstance(m, LoRALinear))
    assert attention.lora_A.weight.dtype == expected
    assert layer.router.token_weight.dtype == torch.float32
    out = model(**_batch())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_autocast_cpu_bf16_trains_and_keeps_the_router_fp32():
    model = _model()
    model.train()
    reference = model(**_batch())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # bf16 GEMMs (8 mantissa bits) through 2 layers: the LM loss moves by about 1e-2.
    assert abs(out.loss.item() - reference.loss.item()) < 0.1
    layer = model.gmoe_layers()[0]
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert layer.last_routing[0].dtype == torch.float32
    expected_probs = layer.router(x)[1]
    torch.testing.assert_close(layer.last_routing[0], expected_probs, atol=0, rtol=0)
    assert y.dtype == torch.bfloat16


class HookedLinear(nn.Linear):
    """A stand-in for a quantized or offloaded base linear: its weight is never to be read
    directly (reading it raises), and a forward hook counts calls, as Accelerate's hooks do."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.calls = 0
        self.register_forward_hook(lambda module, args, out: setattr(module, "calls", module.calls + 1))

    def forward(self, x):
        return super().forward(x)


def test_base_modules_are_called_not_their_weights():
    torch.manual_seed(0)
    base = tiny_model("llama")
    mlp = base.model.layers[0].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, HookedLinear(getattr(mlp, name)))
    model = gmoe.get_gmoe_model(base, gmoe.GMoEConfig(**CFG))
    model(**_batch())
    assert [getattr(mlp, n).calls for n in ("gate_proj", "up_proj", "down_proj")] == [1, 1, 1]


def _quantize_mlps(base, kind):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the test extra; not installed here")
    for layer in base.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(layer.mlp, name)
            if kind == "int8":
                q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=torch.float32)
            q.load_state_dict(linear.state_dict())
            setattr(layer.mlp, name, q.to("cpu"))  # .to() quantizes
    return base


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_bitsandbytes_base_trains(kind):
    """QLoRA-style: GMoE on bitsandbytes 8-bit / 4-bit MLP linears (bitsandbytes' CPU backend).

    Training runs before any eval-mode no-grad forward: bitsandbytes 0.50's CPU Linear4bit
    repacks its weight on the first such call and afterwards passes no input gradient (seen
    with a bare Linear4bit, no GMoE involved; see README, "QLoRA")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        base = _quantize_mlps(tiny_model("llama", hidden=64, inter=128), kind)  # bnb CPU 4-bit: 64-wide blocks
        batch = _batch()
        with torch.no_grad():
            expected = base(**batch).logits
        model = gmoe.get_gmoe_model(base, gmoe.GMoEConfig(**CFG))
        model.train()
        out = model(**batch)
        out.loss.backward()
        with torch.no_grad():  # B = 0 at injection: the quantized base, up to 16-bit rounding (bitsandbytes'
            # CPU kernels round activations to 16 bits, so h_c = (w_1 + w_2)·h, equal to h to 1 ulp of
            # fp32, can round differently there)
            got = model.eval()(**batch).logits
    assert_close(got, expected, dtype=torch.float16, name="logits")
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}
    assert torch.isfinite(out.loss) and grads
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n), "no gradient reached the experts"


def test_disable_adapter_gives_the_base_model_exactly():
    torch.manual_seed(0)
    base = tiny_model("llama")
    batch = _batch()
    with torch.no_grad():
        expected = base(**batch).logits
    model = gmoe.get_gmoe_model(base, gmoe.GMoEConfig(**CFG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.2)
        adapted = model(**batch).logits
        model.train()
        load_before = model.expert_load()
        with model.disable_adapter():
            out = model(**batch)
        torch.testing.assert_close(out.logits, expected, atol=0, rtol=0)  # same modules, same order
        assert "router_loss" not in out and torch.equal(model.expert_load(), load_before)
        assert not torch.allclose(adapted, expected)
        torch.testing.assert_close(model.eval()(**batch).logits, adapted, atol=0, rtol=0)  # back on after


def test_merge_attention_folds_the_attention_loras_and_keeps_the_experts():
    model = _model().eval()
    batch = _batch()
    with torch.no_grad():
        before = model(**batch).logits
        model.merge_attention()
        after = model(**batch).logits
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert len(model.gmoe_layers()) == 2
    assert_close(after, before, dtype=torch.float32, name="logits after merge")


def test_merge_and_unload_refuses_to_drop_experts_silently():
    model = _model()
    with pytest.raises(ValueError, match="experts cannot be merged"):
        model.merge_and_unload()
    base = model.merge_and_unload(drop_experts=True)
    assert not any(isinstance(m, (GMoEMLP, LoRALinear)) for m in base.modules())


@pytest.mark.parametrize("zero", ["poisson_loss_coef", "normal_loss_coef"])
def test_zero_coefficient_leaves_no_trainable_parameter_without_gradient(zero):
    """DDP's reducer needs a gradient for every trainable parameter in every step."""
    model = _model(**{zero: 0.0})
    model.train()
    model(**_batch()).loss.backward()
    starved = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert starved == []
    frozen = "poisson_rate" if zero == "poisson_loss_coef" else "normal_std"
    assert not getattr(model.gmoe_layers()[0].router, frozen).requires_grad


def test_linear_router_carries_the_gmoe_losses_only_when_on():
    with_losses = _model(router="linear")
    assert with_losses.gmoe_layers()[0].router.normal_std.requires_grad
    mixlora_like = _model(router="linear", poisson_loss_coef=0.0, normal_loss_coef=0.0, aux_loss_coef=0.01)
    assert not hasattr(mixlora_like.gmoe_layers()[0].router, "normal_std")
    assert [k for k in mixlora_like.adapter_state_dict() if "router" in k and "layers.0." in k] == \
        ["model.layers.0.mlp.router.weight"]


def test_non_finite_hidden_state_does_not_poison_the_running_load():
    model = _model()
    model.train()
    model(**_batch(seed=2)).loss.backward()
    load_before = model.expert_load()
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = float("nan")
    batch = _batch(seed=3)
    batch["input_ids"][0, 2] = 5
    out = model(**batch)
    assert not torch.isfinite(out.loss)  # the trainer's own guards see it
    # The warning naming the layer is deferred off the training step (no host sync there) to
    # where the host reads anyway: expert_load(), save_pretrained, GMoETrainer's logging.
    with pytest.warns(RuntimeWarning, match=r"model\.layers\.0\.mlp"):
        torch.testing.assert_close(model.expert_load(), load_before, atol=0, rtol=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = 0.0
    out = model(**_batch(seed=4))
    assert torch.isfinite(out.loss) and torch.isfinite(model.expert_load()).all()
    assert (model.expert_load() > load_before).any()


def test_adapter_saved_in_bf16_loads_onto_fp32_model(tmp_path):
    model = _model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    saved = model.adapter_state_dict()
    base = model.unload().float()
    loaded = gmoe.GMoEModel.from_pretrained(base, tmp_path)
    for key, value in loaded.adapter_state_dict().items():
        assert value.dtype == (torch.bool if saved[key].dtype == torch.bool else torch.float32), key
        torch.testing.assert_close(value, saved[key].to(value.dtype), atol=0, rtol=0, msg=key)
