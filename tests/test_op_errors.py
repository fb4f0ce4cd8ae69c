"""Bad inputs to the ops raise errors that name the argument and what it needs."""
import pytest
import torch

from gmoe_kernels import functional
from tests.problems import expert_problem, router_problem


def _mix_args(**overrides):
    x, frozen, lora, indices, weights = expert_problem(T=5, H=6, F=7, E=3, K=2, R=2, dtype=torch.float32,
                                                       requires_grad=False)
    args = dict(x=x, gate_base=x @ frozen["gate_weight"].t(), up_base=x @ frozen["up_weight"].t(),
                lora_a_gate=lora["lora_a_gate"], lora_b_gate=lora["lora_b_gate"], lora_a_up=lora["lora_a_up"],
                lora_b_up=lora["lora_b_up"], lora_a_down=lora["lora_a_down"], indices=indices,
                weights=weights, scaling=0.5, activation="silu")
    args.update(overrides)
    return args


MIX_ERRORS = {
    "indices_int32": (lambda a: dict(indices=a["indices"].int()), TypeError, "int64"),
    "indices_wrong_T": (lambda a: dict(indices=a["indices"][:3]), ValueError, r"indices must be \(T, K\)"),
    "K_above_E": (lambda a: dict(indices=torch.zeros(5, 4, dtype=torch.long), weights=torch.ones(5, 4)),
                  ValueError, r"K = 4 must be in \[1, E = 3\]"),
    "expert_id_out_of_range": (lambda a: dict(indices=a["indices"].clone().fill_(3)), ValueError,
                               r"every id must be in \[0, E = 3\)"),
    "x_3d": (lambda a: dict(x=a["x"][None]), ValueError, "flatten batch"),
    "lora_b_gate_shape": (lambda a: dict(lora_b_gate=a["lora_b_gate"][:, :6]), ValueError,
                          r"lora_b_gate must have shape \(3, 7, 2\)"),
    "weights_int": (lambda a: dict(weights=a["weights"].long()), TypeError, "weights must be a floating"),
    "meta_device": (lambda a: dict(gate_base=a["gate_base"].to("meta")), ValueError, "gate_base is on meta"),
    "activation": (lambda a: dict(activation="swiglu"), ValueError, "swiglu"),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(MIX_ERRORS))
def test_expert_mix_rejects(case, backend):
    make, error, pattern = MIX_ERRORS[case]
    args = _mix_args()
    args.update(make(args))
    with pytest.raises(error, match=pattern):
        functional.expert_mix(**args, backend=backend)


ROUTER_ERRORS = {
    "adjacency_shape": (lambda p: dict(adjacency=p["adjacency"][:3, :3]), ValueError, "adjacency must have shape"),
    "score_weight_shape": (lambda p: dict(score_weight=p["score_weight"][:3]), ValueError, "score_weight"),
    "token_weight_H": (lambda p: dict(token_weight=p["token_weight"][:, :5]), ValueError, "token_weight"),
    "top_k": (lambda p: {}, ValueError, "top_k must be an int"),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(ROUTER_ERRORS))
def test_graph_router_rejects(case, backend):
    make, error, pattern = ROUTER_ERRORS[case]
    p = router_problem(dtype=torch.float32)
    p.update(make(p))
    top_k = 9 if case == "top_k" else 2
    with pytest.raises(error, match=pattern):
        functional.graph_router(**p, top_k=top_k, activation="silu", backend=backend)
