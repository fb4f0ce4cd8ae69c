"""Pure-PyTorch twins of every op: the CPU path and the specification the kernels match."""
from .expert_ffn import expert_mix
from .graph_router import graph_router, normalized_adjacency, router_logits
from .loop import expert_ffn_loop, graph_router_loop
from .routing import combine, dispatch, make_routing_plan, topk_route

__all__ = ["combine", "dispatch", "expert_ffn_loop", "expert_mix", "graph_router",
           "graph_router_loop", "make_routing_plan", "normalized_adjacency", "router_logits",
           "topk_route"]
