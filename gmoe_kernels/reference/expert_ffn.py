"""Deprecated module path: the reference expert mix is `gmoe_kernels.reference.expert_mix`.
Kept for one release; importing it warns."""
import warnings

from .expert_mix import expert_mix, expert_mix_backward, expert_mix_forward

warnings.warn("gmoe_kernels.reference.expert_ffn is deprecated: use gmoe_kernels.reference.expert_mix",
              DeprecationWarning, stacklevel=2)

__all__ = ["expert_mix", "expert_mix_backward", "expert_mix_forward"]
