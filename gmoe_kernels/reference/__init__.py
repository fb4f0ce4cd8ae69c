"""Pure-PyTorch twins of every op: the CPU path and the specification the kernels match.

The literal per-expert loops (the tests' oracle) are in gmoe_kernels.naive; their old names
here, `expert_ffn_loop` and `graph_router_loop`, still resolve for one release, with a
DeprecationWarning.
"""
import warnings

from .expert_mix import expert_mix
from .graph_router import graph_router, layer1_constant, normalized_adjacency, router_logits
from .routing import combine, dispatch, make_routing_plan, topk_route

__all__ = ["combine", "dispatch", "expert_mix", "graph_router", "layer1_constant", "make_routing_plan",
           "normalized_adjacency", "router_logits", "topk_route"]

_MOVED_TO_NAIVE = ("expert_ffn_loop", "graph_router_loop")


def __getattr__(name):
    if name in _MOVED_TO_NAIVE:
        warnings.warn(f"gmoe_kernels.reference.{name} is deprecated: use gmoe_kernels.naive.{name}",
                      DeprecationWarning, stacklevel=2)
        from .. import naive
        return getattr(naive, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
