"""Deprecated module path: the per-expert and per-token loops (the oracle) are
`gmoe_kernels.naive`. Kept for one release; importing it warns."""
import warnings

from ..naive import expert_ffn_loop, graph_router_loop

warnings.warn("gmoe_kernels.reference.loop is deprecated: use gmoe_kernels.naive",
              DeprecationWarning, stacklevel=2)

__all__ = ["expert_ffn_loop", "graph_router_loop"]
