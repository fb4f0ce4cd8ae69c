"""Find host synchronisations on a CPU, where torch.cuda.set_sync_debug_mode sees nothing.

`record_host_syncs()` records, for the block it guards, every operation that makes the host
wait for a GPU:
- reading a value: `.item()`, `bool(t)`, `int(t)`, `float(t)`, `if t:` (all of them dispatch
  `aten._local_scalar_dense`), `torch.equal`, `is_nonzero`;
- ops whose output size depends on the data: `nonzero` (`nonzero_static` is fine),
  `masked_select`, indexing with a bool mask, `unique`, `bincount`, `repeat_interleave` with
  tensor repeats and no output_size;
- `.tolist()`, `.numpy()`, `__array__`: these read memory without going through the dispatcher,
  so the Tensor methods are wrapped for the block.
Our custom ops (the Triton launchers, `gmoe_kernels::*`) reach a dispatch mode as one op whose
body runs with the mode switched off; the recorder runs their bodies itself, so the launchers'
own code is checked too.

Each record names the op and the innermost frame outside torch that issued it; `ours()` keeps
those issued by this project's packages (gmoe/, gmoe_kernels/).

`check_training_step(step)` is what a GPU script runs: one warm-up call of `step`, then one
recorded call, on CUDA also under torch.cuda.set_sync_debug_mode("error").
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_PACKAGES = tuple(os.path.join(_ROOT, p) + os.sep for p in ("gmoe", "gmoe_kernels"))
_SKIPPED = (os.path.dirname(torch.__file__) + os.sep, os.path.abspath(__file__))

SYNC_OPS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "masked_scatter",
            "masked_scatter_", "_unique", "_unique2", "unique_dim", "unique_consecutive",
            "unique_dim_consecutive", "bincount"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}
HOST_READS = ("tolist", "numpy", "__array__")


@dataclasses.dataclass
class Sync:
    op: str
    path: str   # file of the innermost frame outside torch
    where: str  # "file:line in function" of that frame, for messages

    def __str__(self):
        return f"{self.op} at {self.where}"


def _issuer() -> tuple[str, str]:
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_SKIPPED):
            return path, f"{os.path.relpath(path, _ROOT)}:{frame.lineno} in {frame.name}"
    return "", "<no Python frame>"


def is_sync(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name in INDEX_OPS:  # a bool mask becomes indices through nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "repeat_interleave":  # tensor repeats: the output length is their sum
        repeats = args[0] if func._overloadname == "Tensor" else (args[1:2] or [kwargs.get("repeats")])[0]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


def _custom_op_body(func):
    """The Python function behind one of our `torch.library.custom_op`s, else None."""
    if getattr(func, "namespace", None) != "gmoe_kernels":
        return None
    opdef = custom_ops.OPDEFS.get(func._schema.name)
    return None if opdef is None else opdef._init_fn


class HostSyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[Sync] = []
        self.custom_ops: set[str] = set()  # our custom ops whose bodies ran under the recorder

    def record(self, op: str) -> None:
        self.syncs.append(Sync(op, *_issuer()))

    def ours(self) -> list[Sync]:
        return [s for s in self.syncs if s.path.startswith(OUR_PACKAGES)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_sync(func, args, kwargs):
            self.record(str(func))
        body = _custom_op_body(func)
        if body is None:
            return func(*args, **kwargs)
        self.custom_ops.add(func._schema.name)
        with self:  # the mode is off while it handles an op: switch it back on for the body
            return body(*args, **kwargs)


@contextlib.contextmanager
def record_host_syncs():
    """Yields a HostSyncRecorder that records the block's host synchronisations."""
    recorder = HostSyncRecorder()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrapped(name, method):
        def read(self, *args, **kwargs):
            recorder.record(f"Tensor.{name}")
            return method(self, *args, **kwargs)
        return read

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, wrapped(name, method))
        with recorder:
            yield recorder
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def check_training_step(step, device: torch.device | str | None = None) -> HostSyncRecorder:
    """Run `step()` once unrecorded (one-time work: autotuning, caches), then once recorded.

    On a CUDA device the recorded call also runs under torch.cuda.set_sync_debug_mode("error"),
    which raises at any synchronising CUDA call (this catches what the recorder cannot: a
    blocking copy inside a C++ kernel). Returns the recorder; `recorder.ours()` must be empty.
    """
    step()
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
    try:
        with record_host_syncs() as recorder:
            step()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    return recorder
