"""The CPU fast paths inside the reference ops (benchmarks/NOTES.md, "Training step on
SmolLM2-135M"): the fused activation backward, the expert mix on expert-sorted pairs and the
graph router's own graph-mix backward. The oracle tests in test_reference_ops.py cover the
outputs and gradients; these add float64 gradcheck on each new code path and its edges."""
import pytest
import torch

from gmoe_kernels import functional
from gmoe_kernels.activations import ACTIVATIONS, act_backward, act_grad
from gmoe_kernels.reference import router_logits
from tests.problems import expert_problem, router_problem


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_backward_is_grad_times_act_grad(activation):
    g = torch.linspace(-6, 6, 241, dtype=torch.float64)
    g = g[g != 0]  # relu' at 0 is a convention
    grad = torch.randn_like(g)
    torch.testing.assert_close(act_backward(activation, grad, g), grad * act_grad(activation, g))


def _mix_fn(indices, activation, scaling=0.5):
    def fn(x, gate_base, up_base, a_g, b_g, a_u, b_u, a_d, weights):
        return functional.expert_mix(x, gate_base, up_base, a_g, b_g, a_u, b_u, a_d, indices, weights,
                                     scaling, activation, backend="reference")
    return fn


MIX_CASES = {
    "base": dict(),                                          # every expert gets pairs
    "empty_expert": dict(routing="empty_expert"),            # an expert with no pairs: no span
    "one_expert_K=1": dict(routing="one_expert", K=1),       # one span holds every pair
    "K=E": dict(K=3, E=3),
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", list(MIX_CASES), ids=list(MIX_CASES))
def test_expert_mix_gradcheck_fp64(case, activation):
    """Every input of the op (G and U included), fp64, through the sorted-pair backward."""
    kw = dict(dict(T=5, H=4, F=6, E=3, K=2, R=2), **MIX_CASES[case])
    x, frozen, lora, indices, weights = expert_problem(**kw)
    gate_base = (x.detach() @ frozen["gate_weight"].t()).requires_grad_(True)
    up_base = (x.detach() @ frozen["up_weight"].t()).requires_grad_(True)
    if activation == "relu":  # keep pre-activations away from relu's kink at 0
        gate_base = (gate_base.detach() + 3.0).requires_grad_(True)
    loras = [lora[k] for k in ("lora_a_gate", "lora_b_gate", "lora_a_up", "lora_b_up", "lora_a_down")]
    assert torch.autograd.gradcheck(_mix_fn(indices, activation), (x, gate_base, up_base, *loras, weights))


def test_expert_mix_gradcheck_repeated_expert_fp64():
    """A token listing one expert in both slots (a caller's routing): both pairs add up."""
    x, frozen, lora, indices, weights = expert_problem(T=4, H=4, F=5, E=3, K=2, R=2)
    indices = indices.clone()
    indices[:, 1] = indices[:, 0]
    gate_base = (x.detach() @ frozen["gate_weight"].t()).requires_grad_(True)
    up_base = (x.detach() @ frozen["up_weight"].t()).requires_grad_(True)
    loras = [lora[k] for k in ("lora_a_gate", "lora_b_gate", "lora_a_up", "lora_b_up", "lora_a_down")]
    assert torch.autograd.gradcheck(_mix_fn(indices, "silu"), (x, gate_base, up_base, *loras, weights))


def test_expert_mix_fp32_inputs_keep_their_dtype_and_fp16_computes_in_fp32():
    x, frozen, lora, indices, weights = expert_problem(T=6, H=4, F=6, E=3, K=2, R=2, dtype=torch.float32)
    gate_base, up_base = x @ frozen["gate_weight"].t(), x @ frozen["up_weight"].t()
    loras = [lora[k] for k in ("lora_a_gate", "lora_b_gate", "lora_a_up", "lora_b_up", "lora_a_down")]
    h32, z32 = _mix_fn(indices, "silu")(x, gate_base, up_base, *loras, weights)
    half = [t.detach().half() for t in (x, gate_base, up_base, *loras)]
    h16, z16 = _mix_fn(indices, "silu")(*half, weights.detach())
    assert h16.dtype == z16.dtype == torch.float16 and h32.dtype == torch.float32
    torch.testing.assert_close(h16.float(), h32.detach(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(z16.float(), z32.detach(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layers", [1, 2, 3], ids=["L=1", "L=2", "L=3"])
def test_graph_router_gradcheck_with_trainable_adjacency_fp64(layers):
    """The node-major GCN with its own graph-mix backward: every input, the normalised
    adjacency included (the model keeps it fixed, so that gradient is otherwise never taken);
    L=1 makes the first layer the last (expert rows only)."""
    p = router_problem(T=3, H=5, G=4, E=3, L=layers, edges=((0, 1),))
    p["adjacency"] = p["adjacency"].detach().clone().requires_grad_(True)
    names = ["x", "token_weight", "expert_weight", "adjacency", "gcn_weight", "score_weight"]

    def fn(*tensors):
        return router_logits(**dict(p, **dict(zip(names, tensors))), activation="silu")

    assert torch.autograd.gradcheck(fn, tuple(p[n] for n in names))
