"""Triton backend (GPU; the CPU interpreter under TRITON_INTERPRET=1).

One op = `_<op>_kernels.py` (only @triton.jit code) + `<op>.py` (launchers, autograd).
Same signatures and results as gmoe_kernels.reference.
"""
from .expert_ffn import ExpertMixFunction, expert_mix
from .routing import combine, dispatch, make_routing_plan, topk_route

__all__ = ["ExpertMixFunction", "combine", "dispatch", "expert_mix", "make_routing_plan",
           "topk_route"]

try:
    from .graph_router import graph_router
except ModuleNotFoundError as exc:  # the graph router kernels land separately
    if exc.name != f"{__name__}.graph_router":
        raise
else:
    __all__.append("graph_router")
