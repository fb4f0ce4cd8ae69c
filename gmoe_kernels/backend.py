"""Backend selection: which implementation of each op runs.

  "reference"  pure PyTorch (gmoe_kernels.reference): runs everywhere, the specification.
  "triton"     Triton kernels (gmoe_kernels.triton): CUDA tensors, or any device under
               TRITON_INTERPRET=1 (the CPU interpreter, used by the tests).
  "auto"       triton when the tensors are on a CUDA device and Triton imports, else reference
               (never the interpreter: only an explicit "triton" runs it).
The environment variable GMOE_BACKEND, when set, overrides the caller's choice.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton")


# Decided once at import: a constant, so torch.compile traces no import machinery.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return "reference" or "triton" for a requested backend and the tensors' device."""
    requested = os.environ.get("GMOE_BACKEND") or backend or "auto"
    if requested not in BACKENDS:
        source = "GMOE_BACKEND" if os.environ.get("GMOE_BACKEND") else "backend"
        raise ValueError(f"{source}={requested!r} is not a backend; choose one of {BACKENDS}")
    if requested == "reference":
        return "reference"
    on_gpu = triton_available() and device.type == "cuda"
    if requested == "auto":  # never the interpreter: it is for tests, and slow
        return "triton" if on_gpu else "reference"
    usable = on_gpu or (triton_available() and interpreting())
    if not usable:
        raise RuntimeError(
            f"backend='triton' needs Triton and CUDA tensors (got device {device}, Triton "
            f"{'installed' if triton_available() else 'not installed'}); use backend='reference' or "
            "'auto', or set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter"
        )
    return "triton"
