"""Input checks shared by every backend: a wrong shape, dtype or device raises an error
that names the argument, what it got and what it needs, before any kernel runs."""
from __future__ import annotations

import torch

from .activations import ACTIVATIONS

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float_and_device(device, **tensors):
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}; move every input to one device")


def _check_shapes(expected: dict, given: dict):
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(given[name].shape)}")


def _check_routing(indices, num_tokens, num_experts, device, host_read=False):
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        raise TypeError(f"indices must be an int64 tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.dim() != 2 or indices.shape[0] != num_tokens:
        raise ValueError(f"indices must be (T, K) = ({num_tokens}, K), got {tuple(indices.shape)}")
    if not 1 <= indices.shape[1] <= num_experts:
        raise ValueError(f"K = {indices.shape[1]} must be in [1, E = {num_experts}]")
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but x is on {device}")
    check_expert_range(indices, num_experts, host_read)


def check_expert_range(indices, num_experts, host_read=False):
    """Expert ids in [0, E), by a device-side assertion: no host synchronisation on a GPU
    (a failure surfaces at the next synchronising call, as torch's embedding reports a bad
    id); on a CPU it fails at once and is reported as a ValueError. Skipped while
    torch.compile traces. `host_read` (decoding, no autograd): on a CPU, one min/max read on
    the host instead (one op, not six: a decoding step runs this once per layer)."""
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    if host_read and indices.device.type == "cpu":
        low, high = torch.aminmax(indices)
        if low < 0 or high >= num_experts:
            raise ValueError(f"indices hold expert ids in [{int(low)}, {int(high)}]; "
                             f"every id must be in [0, E = {num_experts})")
        return
    in_range = (indices.min() >= 0) & (indices.max() < num_experts)
    message = f"every expert id in indices must be in [0, E = {num_experts})"
    try:
        torch._assert_async(in_range, message)
    except RuntimeError:
        if indices.device.type != "cpu":
            raise
        # The error path only: reading the range here costs nothing that matters.
        raise ValueError(f"indices hold expert ids in [{int(indices.min())}, {int(indices.max())}]; "
                         f"every id must be in [0, E = {num_experts})") from None


def check_routing_indices(indices, num_experts):
    """(T, K) int64 expert ids in [0, E), for the routing-plan op."""
    if indices.dim() != 2 or indices.dtype != torch.int64:
        raise ValueError(f"indices must be a (T, K) int64 tensor, got {tuple(indices.shape)} {indices.dtype}")
    check_expert_range(indices, num_experts)


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}; map `transformers` "
                         "names with gmoe_kernels.canonical_activation")


def check_expert_mix(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                     lora_a_down, indices, weights, activation, host_read=False):
    """Shapes, dtypes and devices of `functional.expert_mix`'s inputs (`host_read`: see
    `check_expert_range`)."""
    check_activation(activation)
    _check_float_and_device(x.device, x=x, gate_base=gate_base, up_base=up_base, lora_a_gate=lora_a_gate,
                            lora_b_gate=lora_b_gate, lora_a_up=lora_a_up, lora_b_up=lora_b_up,
                            lora_a_down=lora_a_down, weights=weights)
    if x.dim() != 2:
        raise ValueError(f"x must be (T, H), got {tuple(x.shape)}: flatten batch and sequence first")
    if lora_a_gate.dim() != 3 or lora_a_gate.shape[1] < 1:
        raise ValueError(f"lora_a_gate must be (E, R, H) with R >= 1, got {tuple(lora_a_gate.shape)}")
    (num_tokens, hidden), (num_experts, rank, _) = x.shape, lora_a_gate.shape
    size_f = gate_base.shape[-1]
    _check_routing(indices, num_tokens, num_experts, x.device, host_read)
    top_k = indices.shape[1]
    _check_shapes(
        {"gate_base": (num_tokens, size_f), "up_base": (num_tokens, size_f),
         "lora_a_gate": (num_experts, rank, hidden), "lora_b_gate": (num_experts, size_f, rank),
         "lora_a_up": (num_experts, rank, hidden), "lora_b_up": (num_experts, size_f, rank),
         "lora_a_down": (num_experts, rank, size_f), "weights": (num_tokens, top_k)},
        dict(gate_base=gate_base, up_base=up_base, lora_a_gate=lora_a_gate, lora_b_gate=lora_b_gate,
             lora_a_up=lora_a_up, lora_b_up=lora_b_up, lora_a_down=lora_a_down, weights=weights))


def check_graph_router(x, token_weight, expert_weight, expert_features, adjacency, gcn_weight,
                       score_weight, top_k, activation, query_weight=None):
    """Shapes, dtypes and devices of `functional.graph_router`'s inputs."""
    check_activation(activation)
    if query_weight is not None and score_weight is not None:
        raise ValueError("pass score_weight=None with query_weight: the token readout W_q x replaces the "
                         "shared readout w_p")
    readout = dict(score_weight=score_weight) if query_weight is None else dict(query_weight=query_weight)
    _check_float_and_device(x.device, x=x, token_weight=token_weight, expert_weight=expert_weight,
                            expert_features=expert_features, adjacency=adjacency, gcn_weight=gcn_weight,
                            **readout)
    if x.dim() != 2:
        raise ValueError(f"x must be (T, H), got {tuple(x.shape)}: flatten batch and sequence first")
    if gcn_weight.dim() != 3 or gcn_weight.shape[0] < 1:
        raise ValueError(f"gcn_weight must be (L, G, G) with L >= 1, got {tuple(gcn_weight.shape)}")
    hidden, width, num_experts = x.shape[1], gcn_weight.shape[1], expert_features.shape[0]
    _check_shapes(
        {"token_weight": (width, hidden), "expert_weight": (width, hidden),
         "expert_features": (num_experts, hidden), "adjacency": (num_experts + 1, num_experts + 1),
         "gcn_weight": (gcn_weight.shape[0], width, width),
         **({"score_weight": (width,)} if query_weight is None else {"query_weight": (width, hidden)})},
        dict(token_weight=token_weight, expert_weight=expert_weight, expert_features=expert_features,
             adjacency=adjacency, gcn_weight=gcn_weight, **readout))
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, E = {num_experts}], got {top_k!r}")


def check_layer1_constant(constant, x, num_experts, width):
    """The graph router's precomputed layer-1 term C1: (E+1, G), x's compute dtype, x's device."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(constant, torch.Tensor):
        raise TypeError(f"layer1_constant must be a torch.Tensor, got {type(constant).__name__}")
    if tuple(constant.shape) != (num_experts + 1, width):
        raise ValueError(f"layer1_constant must have shape (E+1, G) = {(num_experts + 1, width)}, got "
                         f"{tuple(constant.shape)}; compute it with functional.graph_router_constant")
    if constant.dtype != compute or constant.device != x.device:
        raise ValueError(f"layer1_constant is {constant.dtype} on {constant.device}; x ({x.dtype} on {x.device}) "
                         f"needs {compute} on {x.device}: pass graph_router_constant(..., dtype={compute})")
