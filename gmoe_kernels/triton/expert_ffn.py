"""Deprecated module path: the expert mix's Triton backend is `gmoe_kernels.triton.expert_mix`
(launchers, registration) and `gmoe_kernels.triton.expert_mix_configs` (configs, cost model).
Kept for one release; importing it warns. The op itself, `gmoe_kernels.functional.expert_ffn`,
is unchanged."""
import warnings

from .expert_mix import expert_mix, expert_mix_backward, expert_mix_forward
from .expert_mix_configs import EXPAND_MODES, expand_mode

warnings.warn("gmoe_kernels.triton.expert_ffn is deprecated: use gmoe_kernels.triton.expert_mix "
              "(and expert_mix_configs for expand_mode)", DeprecationWarning, stacklevel=2)

__all__ = ["EXPAND_MODES", "expand_mode", "expert_mix", "expert_mix_backward", "expert_mix_forward"]


def __getattr__(name):
    if name == "ExpertMixFunction":  # this module exported it too: the same stand-in as the package's
        from . import __getattr__ as package_attribute
        return package_attribute(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
