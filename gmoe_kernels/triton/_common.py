"""Launch helpers every Triton op shares: output buffers, stride arguments, config choice."""
from __future__ import annotations

import contextlib
import os

import torch
import triton


def poisoning() -> bool:
    """GMOE_POISON=1: outputs the kernels must fully write start as NaN (-1 for integers), so
    an element a kernel forgets fails the tests. Read at every call."""
    return os.environ.get("GMOE_POISON", "0") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer every element of which a kernel writes (poisoned under GMOE_POISON=1)."""
    if poisoning():
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def strides(name: str, tensor: torch.Tensor | None, dims: str) -> dict:
    """Keyword arguments {"stride_<name>_<dim>": tensor.stride(i)}, one per dimension named in
    `dims`: letters ("tf" for a (T, F) tensor) or names (("layer", "out", "in")); zeros for an
    absent tensor (a kernel's optional operand)."""
    return {f"stride_{name}_{dim}": tensor.stride(i) if tensor is not None else 0
            for i, dim in enumerate(dims)}


def device_guard(device: torch.device):
    """Make `device` current while launching (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_AUTOTUNERS: dict = {}


def launch(kernel, grid, configs, key=(), reset_to_zero=(), **arguments):
    """kernel[grid](**arguments) with one of `configs`, already pruned by the caller for this
    launch (expert_mix_configs): the only one, or the fastest as triton.autotune times them
    (`key`: the arguments whose values select a timing; `reset_to_zero`: the outputs to clear
    between timed runs). Under torch.use_deterministic_algorithms the first config runs
    without timing: configs tile differently, and so sum in another order, and a timed choice
    can differ from one process to the next.

    Triton's public API cannot prune with anything but the kernel's own arguments
    (`prune_configs_by` hooks see no target, no launch context), nor run one chosen config of
    an autotuned kernel; so configs are pruned before the launch, the untimed case launches
    the @triton.jit function itself, and one `triton.autotune` wrapper is kept per pruned set.
    """
    if len(configs) == 1 or torch.are_deterministic_algorithms_enabled():
        return kernel[grid](**arguments, **configs[0].all_kwargs())
    ident = (kernel, tuple(configs), tuple(key), tuple(reset_to_zero))
    tuner = _AUTOTUNERS.get(ident)
    if tuner is None:
        tuner = triton.autotune(configs=list(configs), key=list(key),
                                reset_to_zero=list(reset_to_zero) or None)(kernel)
        _AUTOTUNERS[ident] = tuner
    return tuner[grid](**arguments)
