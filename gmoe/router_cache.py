"""The eval-mode cache of a router's token-independent terms (DESIGN.md, "Inference").

At one token most of the graph router's arithmetic does not depend on the token: the expert
nodes P = act(X W_expᵀ) and the first layer's constant C1 = (Â[:, :E] P) W_1ᵀ (about 1.8 M
of its 2.4 M multiply-adds per layer at SmolLM2's size), and Â itself. In eval they are
computed once and reused while nothing they are computed from has changed.

An entry is keyed on, for every tensor the terms are computed from: the tensor object, its
storage address, its version counter, device, dtype and shape; plus the backend, the compute
dtype and any plain settings the caller names. So an entry is rebuilt after
- an in-place write through autograd's view of the tensor, which bumps its version counter:
  `load_state_dict` / `load_adapter_state_dict` (`copy_`), `with torch.no_grad(): p.add_(...)`,
  or a for-loop or foreach optimizer step;
- `.to()` / `.double()` / a new Parameter or buffer (a new storage or a new object);
- a backend or dtype change.
Fused optimizer steps (`torch.optim.AdamW(fused=True)`, the default `adamw_torch_fused` of
transformers' Trainer) write the parameters without bumping their version counters, so the
router also drops its entry at every forward that can lead to a step (training mode, or
autograd recording with a source requiring grad) and whenever it enters or leaves training
mode. A write through `.data` (`p.data.copy_(...)`) bypasses the version counter, as it
bypasses autograd: call `GMoEModel.clear_router_cache()` after one.

The cache is never used while autograd needs the terms' gradients (grad mode on and a source
tensor requiring grad), in training mode (so the training step is unchanged), while
torch.compile traces (the terms are then part of the compiled graph), or for inference tensors
(they have no version counter).
"""
from __future__ import annotations

from typing import Callable

import torch


def _fingerprint(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tensor._version, tensor.device, tensor.dtype, tuple(tensor.shape))


class TermCache:
    """One cached value (any object of tensors) and the key it was built for.

    `get(sources, settings, build)` returns build()'s value, reusing the cached one while the
    key of `sources` (tensors) and `settings` (hashable) is unchanged. `builds` counts the
    builds (tests read it). Stored as a plain attribute of its module: not a buffer, so it is
    never saved with the adapter nor cast by `.to()`.
    """

    def __init__(self):
        self._sources: tuple = ()
        self._key = None
        self._value = None
        self.builds = 0

    def usable(self, module: torch.nn.Module, sources) -> bool:
        """Whether the cache may serve `module` now (see the module docstring)."""
        if module.training or torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return False
        return not any(t.is_inference() for t in sources)

    def get(self, sources, settings: tuple, build: Callable[[], object]):
        # Values built in inference mode are inference tensors, which autograd cannot save:
        # they serve inference mode only.
        key = (tuple(_fingerprint(t) for t in sources), settings, torch.is_inference_mode_enabled())
        fresh = (self._key == key and len(self._sources) == len(sources)
                 and all(a is b for a, b in zip(self._sources, sources)))
        if not fresh:
            self._value = build()
            self._sources, self._key = tuple(sources), key
            self.builds += 1
        return self._value

    def clear(self) -> None:
        # (not while torch.compile traces: the cache is never used there, and the mode switch clears)
        if not torch.compiler.is_compiling():
            self._sources, self._key, self._value = (), None, None
