"""How every number is measured, identically for every contender.

- time: median over repeats after warm-up. GPU: `triton.testing.do_bench` (return_mode
  "median"; CUDA events when Triton is absent). CPU: `torch.utils.benchmark.Timer`
  (`blocked_autorange`, median of its blocks) with torch's threads = the machine's cores.
- saved_bytes: bytes of the distinct storages that autograd saves for backward during one
  forward, counted with `torch.autograd.graph.saved_tensors_hooks`; storages of weights and
  inputs (which exist anyway) are left out, so this is the activation memory a training step
  keeps per layer.
- peak_bytes (GPU only): `torch.cuda.max_memory_allocated` during one call, minus what was
  allocated before it.
- floor: the frozen dense FFN's FLOPs (3 GEMMs forward, 3 input-gradient GEMMs backward) and
  bytes, turned into a time with this machine's measured GEMM rate and copy bandwidth;
  floor_fraction = floor_ms / ms.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import torch
import torch.utils.benchmark as tbench


@dataclass(frozen=True)
class Settings:
    warmup: int          # CPU: calls before timing; GPU: do_bench warm-up (ms)
    min_reps: int        # at least this many timed repeats
    min_time_s: float    # CPU: at least this much timed time per measurement
    rep_ms: int          # GPU: do_bench repetition time (ms)


QUICK = Settings(warmup=1, min_reps=5, min_time_s=0.2, rep_ms=40)
FULL = Settings(warmup=2, min_reps=10, min_time_s=1.0, rep_ms=100)


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def setup_threads(device: torch.device, threads: int | None = None) -> int:
    """On CPU, one torch thread per core (the issue's rule); returns the count used."""
    if device.type == "cpu":
        torch.set_num_threads(threads or machine_cores())
    return torch.get_num_threads()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, settings: Settings) -> tuple[float, int]:
    """Median milliseconds of fn() and the number of timed repeats."""
    if device.type == "cuda":
        return _time_cuda(fn, device, settings)
    start = time.perf_counter()
    for _ in range(settings.warmup):
        fn()
    estimate = (time.perf_counter() - start) / max(1, settings.warmup)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=max(settings.min_time_s, settings.min_reps * estimate))
    return m.median * 1e3, len(m.times) * m.number_per_run


def _time_cuda(fn, device, settings: Settings) -> tuple[float, int]:
    fn()  # compile / autotune outside the estimate
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    synchronize(device)
    estimate = max(start.elapsed_time(end), 1e-3)
    rep = max(settings.rep_ms, settings.min_reps * estimate)
    warmup = max(settings.warmup if settings.warmup > 2 else 10, estimate)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=int(warmup), rep=int(rep), return_mode="median")), max(1, int(rep / estimate))
    times = []
    for _ in range(max(settings.min_reps, int(rep / estimate))):
        start.record()
        fn()
        end.record()
        synchronize(device)
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], len(times)


def saved_bytes(forward, persistent) -> int:
    """Bytes of distinct storages saved for backward by one forward(), less `persistent` ones."""
    skip = {t.untyped_storage().data_ptr() for t in persistent if isinstance(t, torch.Tensor)}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in skip and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = forward()
    del outs
    return sum(seen.values())


def peak_bytes(fn, device: torch.device) -> int | None:
    """Peak CUDA memory above the starting point during one fn(); None off the GPU."""
    if device.type != "cuda":
        return None
    gc.collect()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# --------------------------------------------------------------------------- the floor
def ffn_floor(tokens: int, hidden: int, inter: int, mode: str, elem_bytes: int) -> tuple[float, float]:
    """(FLOPs, bytes) of the frozen dense FFN, the least any contender can do.

    Forward: gate, up and down GEMMs, 2·T·H·F FLOPs each; bytes = the three weights plus the
    layer's input and output. fwd_bwd adds the three input-gradient GEMMs (same FLOPs) and
    reads the weights again, dy and the saved gate/up states, and writes dx.
    """
    flops = 3 * 2.0 * tokens * hidden * inter
    moved = 3 * hidden * inter + 2 * tokens * hidden
    if mode == "fwd_bwd":
        flops *= 2
        moved += 3 * hidden * inter + 2 * tokens * hidden + 2 * tokens * inter
    return flops, float(moved * elem_bytes)


@dataclass(frozen=True)
class Roof:
    gemm_flops_per_s: float   # measured: one large GEMM in the benchmark dtype
    bytes_per_s: float        # measured: one large tensor copy (read + write)

    def floor_ms(self, flops: float, moved: float) -> float:
        return 1e3 * max(flops / self.gemm_flops_per_s, moved / self.bytes_per_s)


def calibrate(device: torch.device, dtype: torch.dtype, settings: Settings) -> Roof:
    """This machine's achievable GEMM rate and copy bandwidth (the floor's units)."""
    if device.type == "cuda":
        m = n = k = 8192
        copy_elems = 1 << 28
    else:
        m, n, k = 2048, 2816, 1024  # the cpu-medium GEMM itself: the most favourable case
        copy_elems = 1 << 26
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    gemm = time_ms(lambda: a @ b, device, settings)[0]
    src = torch.randn(copy_elems, device=device).to(dtype)
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), device, settings)[0]
    return Roof(2.0 * m * n * k / (gemm / 1e3), 2.0 * src.numel() * src.element_size() / (copy / 1e3))
