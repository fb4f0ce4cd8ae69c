"""The token-readout option of the graph router (`GMoEConfig.token_readout`) in the model: config,
adapter round trip, old adapters, parameters, training on both backends, and the `gmoe-token` method."""
import dataclasses
import json

import pytest
import torch

import gmoe
from gmoe.config import CONFIG_NAME
from tests.models import tiny_model

SMALL = dict(num_experts=4, top_k=2, gcn_dim=16, edge_density=0.5)


def _model(seed=0, **fields):
    torch.manual_seed(0)
    base = tiny_model("llama", hidden=32, inter=48, layers=2)
    torch.manual_seed(seed)
    return gmoe.get_gmoe_model(base, gmoe.GMoEConfig(**{**SMALL, **fields}))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def test_config_field_is_off_by_default_validated_and_saved(tmp_path):
    assert gmoe.GMoEConfig().token_readout is False  # `gmoe` stays the paper's router
    with pytest.raises(ValueError, match=r"GMoEConfig.token_readout='yes' is invalid: must be true or false"):
        gmoe.GMoEConfig(token_readout="yes")
    with pytest.raises(ValueError, match=r"token_readout=True is invalid: .*set router='graph'"):
        gmoe.GMoEConfig(token_readout=True, router="linear")
    cfg = gmoe.GMoEConfig(token_readout=True)
    cfg.save(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["token_readout"] is True
    assert gmoe.GMoEConfig.load(tmp_path) == cfg


def test_the_router_reads_with_w_q_in_place_of_w_p():
    token = _model(token_readout=True)
    for layer in token.gmoe_layers():
        assert not hasattr(layer.router, "score_weight") and layer.router.query_weight.shape == (16, 32)
    assert any(k.endswith("router.query_weight") for k in token.adapter_state_dict())
    assert not any(k.endswith("router.score_weight") for k in token.adapter_state_dict())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_parameter_trains_and_the_backends_agree(backend):
    """One training step: W_q gets a gradient (DDP's reducer needs every trainable parameter to),
    and the Triton path (interpreter) gives the reference's loss and router gradients."""
    models = {b: _model(token_readout=True, backend=b).train() for b in ("reference", backend)}
    out = {}
    for name, model in models.items():
        with torch.no_grad():  # B starts at zero: make every expert matter
            for pname, p in model.named_parameters():
                if p.requires_grad and "lora_B" in pname:
                    p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        loss = model(**_batch()).loss
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), name
        out[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if "router" in n})
    ref_loss, ref_grads = out["reference"]
    loss, grads = out[backend]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        # fp32 on both paths, summed in different orders (over tokens, nodes and G): ~1e-6 of the
        # gradient's scale here, as for the published readout; 1e-5 leaves room, a wrong term does not
        assert (grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    assert models[backend].routing_stats().layers[0].effective_experts > 1.0


def test_adapter_round_trip_gives_the_same_logits(tmp_path):
    model = _model(token_readout=True).train()
    model(**_batch()).loss.backward()
    with torch.no_grad():
        for layer in model.gmoe_layers():
            layer.router.query_weight.add_(0.1)
    model.eval()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    again = gmoe.GMoEModel.from_pretrained(tiny_model("llama", hidden=32, inter=48, layers=2), tmp_path)
    assert again.gmoe_config.token_readout is True
    with torch.no_grad():
        torch.testing.assert_close(again(**_batch()).logits, model(**_batch()).logits, rtol=0, atol=0)


def test_an_adapter_of_format_2_loads_without_the_field(tmp_path):
    """Adapters written before the option (format 2: no token_readout) load with it off."""
    model = _model()
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["format_version"] == 3
    del data["token_readout"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**data, "format_version": 2}))
    torch.manual_seed(0)
    again = gmoe.GMoEModel.from_pretrained(tiny_model("llama", hidden=32, inter=48, layers=2), tmp_path)
    assert again.gmoe_config == dataclasses.replace(model.gmoe_config, token_readout=False)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**_batch()).logits, model.eval()(**_batch()).logits, rtol=0, atol=0)


def test_eval_cache_gives_the_uncached_routing():
    """The eval cache of the token-independent terms serves the token readout unchanged."""
    model = _model(token_readout=True).eval()
    with torch.no_grad():
        cached = model(**_batch()).logits
        for layer in model.gmoe_layers():
            layer.router.cache_terms = False
        assert torch.equal(model(**_batch()).logits, cached)


def test_training_step_with_the_token_readout_has_no_host_sync():
    """The readout op's launchers (Triton on the interpreter) and the telemetry make no host sync."""
    from tests.host_sync import check_training_step

    model = _model(token_readout=True, backend="triton").train()
    model.base_model.set_attn_implementation("eager")  # (sdpa's mask helper syncs: transformers, not ours)
    batch = _batch()

    def step():
        model.zero_grad()
        model(**batch).loss.backward()
    recorder = check_training_step(step)
    assert not recorder.ours(), "\n".join(map(str, recorder.ours()))
    assert {"gmoe_kernels::graph_router_gcn_readout", "gmoe_kernels::graph_router_gcn_readout_backward"} \
        <= recorder.custom_ops


def test_the_gmoe_token_method():
    """`gmoe-token`: gmoe's losses and graph with the token readout on (and the settings it was
    measured with); `gmoe` stays the paper's router. The step benchmark times the same router."""
    from benchmarks.contenders.step import TOKEN_ROUTER
    from gmoe.finetune.methods import AdapterSpec, gmoe_config

    token, paper = gmoe_config("gmoe-token", AdapterSpec()), gmoe_config("gmoe", AdapterSpec())
    assert (token.token_readout, token.token_init_gain, token.load_decay) == (True, 3.0, 0.9)
    assert (paper.token_readout, paper.token_init_gain, paper.load_decay) == (False, 100.0, 1.0)
    assert dataclasses.replace(token, token_readout=False, token_init_gain=100.0, load_decay=1.0) == paper
    assert all(getattr(token, k) == v for k, v in TOKEN_ROUTER.items())
