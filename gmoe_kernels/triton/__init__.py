"""Triton backend (GPU; the CPU interpreter under TRITON_INTERPRET=1).

One op = `_<op>_kernels.py` (only @triton.jit code) + `<op>.py` (launchers, torch.library
registration); the expert mix's configs and cost model are in `expert_mix_configs.py`.
Same signatures and results as gmoe_kernels.reference.
"""
from .expert_mix import expert_mix
from .graph_router import graph_router
from .routing import combine, dispatch, make_routing_plan, topk_route

__all__ = ["combine", "dispatch", "expert_mix", "graph_router", "make_routing_plan", "topk_route"]


def __getattr__(name):
    # The autograd.Function this package exported until the ops were registered with
    # torch.library; kept for one release (warns on use).
    if name == "ExpertMixFunction":
        import torch

        from ..registration import DeprecatedFunction
        return DeprecatedFunction("gmoe_kernels.triton.ExpertMixFunction",
                                  torch.ops.gmoe_kernels.expert_mix,
                                  "torch.ops.gmoe_kernels.expert_mix")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
