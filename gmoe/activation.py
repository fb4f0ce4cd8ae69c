"""Which activation a Hugging Face decoder MLP uses, as a gmoe_kernels activation name."""
from __future__ import annotations

import torch
import torch.nn as nn

from gmoe_kernels.activations import ACTIVATIONS, act, canonical_activation

__all__ = ["detect_activation"]


def detect_activation(model: nn.Module, mlp: nn.Module) -> str:
    """The canonical name of the MLP's activation, checked numerically against act_fn.

    model: the Hugging Face model (its config's `hidden_activation` / `hidden_act` are tried
           first); mlp: one of its decoder MLPs (with `act_fn`).
    Raises ValueError when act_fn matches none of gmoe_kernels.activations.ACTIVATIONS.
    """
    config = getattr(model, "config", None)
    names = [getattr(config, key, None) for key in ("hidden_activation", "hidden_act")]
    candidates = [canonical_activation(n) for n in names if isinstance(n, str) and _known(n)]
    probe = torch.linspace(-6, 6, 97, dtype=torch.float64)
    with torch.no_grad():
        expected = mlp.act_fn(probe)
        for name in candidates + [a for a in ACTIVATIONS if a not in candidates]:
            if torch.allclose(act(name, probe), expected, atol=1e-6):
                return name
    raise ValueError(f"{type(mlp).__name__}.act_fn ({type(mlp.act_fn).__name__}) matches none of the "
                     f"supported activations {ACTIVATIONS}")


def _known(name: str) -> bool:
    try:
        canonical_activation(name)
        return True
    except ValueError:
        return False
