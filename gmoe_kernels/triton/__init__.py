"""Triton backend (GPU; the CPU interpreter under TRITON_INTERPRET=1).

One op = `_<op>_kernels.py` (only @triton.jit code) + `<op>.py` (launchers, autograd).
Same signatures and results as gmoe_kernels.reference.
"""
from .expert_ffn import ExpertMixFunction, expert_mix
from .graph_router import graph_router
from .routing import combine, dispatch, make_routing_plan, topk_route

__all__ = ["ExpertMixFunction", "combine", "dispatch", "expert_mix", "graph_router",
           "make_routing_plan", "topk_route"]
