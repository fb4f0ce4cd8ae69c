"""gmoe_kernels: fused ops for GMoE (graph-routed mixture of LoRA experts).

Never imports `transformers`. Public ops live in `gmoe_kernels.functional`; the optimised
pure-PyTorch twins (the CPU backend and the specification) in `gmoe_kernels.reference`; the
Triton kernels in `gmoe_kernels.triton`; the literal per-expert loops the tests compare against
in `gmoe_kernels.naive`. Every differentiable op is registered one way
(`gmoe_kernels.registration`).
"""
from . import functional
from .activations import ACTIVATIONS, canonical_activation
from .backend import BACKENDS, resolve_backend
from .routing_plan import RoutingPlan

__version__ = "0.1.0"
__all__ = ["ACTIVATIONS", "BACKENDS", "RoutingPlan", "canonical_activation", "functional",
           "resolve_backend", "__version__"]
