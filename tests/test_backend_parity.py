"""A whole GMoE model on the Triton kernels (interpreter) against the same model on the reference:
same logits, loss and gradients; adapters move between backends unchanged."""
import pytest
import torch

from gmoe import GMoEConfig, GMoEModel, get_gmoe_model
from tests.models import tiny_model

SMALL = dict(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_dim=16, edge_density=0.5)


def _randomized(router):
    torch.manual_seed(3)
    model = get_gmoe_model(tiny_model("llama"), GMoEConfig(**SMALL, router=router, backend="reference"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("router", ["graph", "linear"])
def test_triton_and_reference_models_agree(router, tmp_path):
    model = _randomized(router).train()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    results = {}
    for backend in ("reference", "triton"):
        model.gmoe_config.backend = backend
        for layer in model.gmoe_layers():
            layer.expert_load.zero_()
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.detach(), out.loss.detach(), grads, model.expert_load())
    (l_ref, loss_ref, g_ref, load_ref), (l_tri, loss_tri, g_tri, load_tri) = results["reference"], results["triton"]
    torch.testing.assert_close(l_tri, l_ref, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(loss_tri, loss_ref, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(load_tri, load_ref, atol=1e-4, rtol=1e-4)
    assert g_tri.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_tri[name], g_ref[name], atol=5e-5, rtol=5e-3, msg=name)
    # an adapter saved from the Triton model loads on the reference backend, unchanged
    model.eval()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded = GMoEModel.from_pretrained(model.unload(), tmp_path, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=2e-5, rtol=2e-4)
