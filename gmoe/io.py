"""Adapter files on disk: atomic writes, and strict reads that either load everything or nothing.

An interrupted save never leaves a half-written adapter file; a truncated, tampered or
mismatched adapter file raises a ValueError naming the file and the problem, before any
tensor of the model is touched.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


@contextlib.contextmanager
def atomic_save_dir(path, file_names):
    """Yield a private temporary folder; on success move each of `file_names` into `path`.

    Only those files are replaced (anything else in `path`, such as Trainer checkpoints,
    is left alone). Each file is flushed, then renamed into place, so every file is
    either the old or the complete new version. `file_names` are moved in the given
    order: put the weights first and the config last, so a config is never newer than
    its weights.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; choose another path")
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gmoe-save-", dir=target))
    try:
        yield tmp
        mode = default_file_mode()
        for name in file_names:
            os.chmod(tmp / name, mode)  # safetensors creates its file 0600; other outputs follow the umask
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        for name in file_names:
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_file_mode() -> int:
    """0o666 under the process's umask: the mode open() gives a new file."""
    try:  # Linux reports it; setting it to read it would race with threads creating files
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)  # elsewhere the umask can only be read by setting it: set it straight back
    os.umask(mask)
    return 0o666 & ~mask


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU), or a ValueError saying the file is bad.

    safetensors parses a JSON header and checks that the tensors' byte ranges tile the file
    exactly, so a truncated file or a header whose shapes or dtypes disagree with the data
    fails here; a header edited consistently (another dtype of the same width, a transposed
    shape) loads and is caught by `check_adapter_state`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the adapter folder is incomplete; save it again")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is corrupt or not a safetensors file ({err}); save the adapter again") from err


def check_adapter_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError unless `state` has exactly the keys of `expected`, each with the same
    shape, the same kind of dtype (floating or bool) and, for floats, only finite values.

    A float adapter may be stored in another float width (an adapter kept in the base dtype);
    an integer tensor where a float is expected means the file was tampered with, and a
    silent cast would load garbage.
    """
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing keys {missing[:5]}"
                         f"{'…' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{'…' if len(unexpected) > 5 else ''}. Was it saved from the same base model "
                         "and GMoE config?")
    for key, want in expected.items():
        value = state[key]
        # λ and σ were 0-dim in adapters of gmoe-kernels 0.1.0 and are (1,) now: the same single value.
        if value.shape != want.shape and not value.numel() == 1 == want.numel():
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)} but this model expects "
                             f"{tuple(want.shape)}; the adapter was made for another base model or config")
        if _kind(value) != _kind(want):
            raise ValueError(f"{source}: {key} has dtype {value.dtype} but this model expects {want.dtype}; "
                             "the file is corrupt or was not written by save_pretrained")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{source}: {key} holds NaN or infinite values; the adapter is corrupt")
    check_router_state(state, source)


def check_router_state(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError unless the router's buffers and scalars hold what training can produce:
    a finite non-negative running load, a symmetric expert graph without self-edges, and a
    positive Poisson rate and Normal std. A negative load would otherwise load and turn the next
    step's Normal loss into NaN (the log of a negative share), far from the file that caused it;
    λ ≤ 0 and σ ≤ 0 no value of training can produce (the losses clamp them to their ranges, so
    they would not fail: they would silently act as the range's end). Matched by key suffix."""
    def bad(key, what):
        raise ValueError(f"{source}: {key} {what}; the adapter is corrupt or was edited by hand")

    for key, value in state.items():
        if key.endswith(".expert_load") and (value < 0).any():
            bad(key, f"holds negative expert loads (min {value.min().item():g}), but a load is a count")
        elif key.endswith(".router.expert_adjacency"):
            graph = value != 0
            if graph.dim() != 2 or not torch.equal(graph, graph.t()):
                bad(key, "is not a symmetric (E, E) expert graph")
            if graph.diagonal().any():
                bad(key, "has self-edges on its diagonal (the self-loops are added by the GCN normalisation)")
        elif key.endswith((".router.poisson_rate", ".router.normal_std")) and (value <= 0).any():
            bad(key, f"is {value.min().item():g}, but it must be > 0")


def _kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return "bool"
    return "floating" if tensor.is_floating_point() else "integer"


#: config attribute of a base model whose attention weights hold a merged GMoE adapter's LoRAs; saved
#: with the model's config.json, so a merged model written to disk and loaded again keeps it
MERGED_MARK = "gmoe_merged_adapter"


def mark_merged(model, config) -> None:
    """Record in `model.config` that `config`'s attention LoRAs were merged into its weights."""
    model_config = getattr(model, "config", None)
    if model_config is not None:
        setattr(model_config, MERGED_MARK, {"base_model_name_or_path": config.base_model_name_or_path,
                                            "target_modules": list(config.target_modules), "r": config.r,
                                            "lora_alpha": config.lora_alpha})


def check_not_merged(model, path) -> None:
    """ValueError when `model` carries MERGED_MARK: loading a GMoE adapter onto it would add its attention
    LoRAs a second time (merge_attention / merge_and_unload(drop_experts=True) folded them in)."""
    mark = getattr(getattr(model, "config", None), MERGED_MARK, None)
    if mark:
        raise ValueError(f"cannot load the adapter {path} onto this model: a GMoE adapter's attention LoRAs were "
                         f"already merged into its weights (config.{MERGED_MARK} = {mark}), so they would apply "
                         "twice. Load the adapter onto the original base model; if this adapter was trained on "
                         f"the merged model itself, delete the mark first (del model.config.{MERGED_MARK})")
