"""How every number is measured, identically for every contender.

- time: median over repeats after warm-up. GPU: `triton.testing.do_bench` (return_mode
  "median"; CUDA events when Triton is absent), one contender after another. CPU:
  `torch.utils.benchmark.Timer` with torch's threads = the machine's cores, and the
  contenders of a case *interleaved*: every round times each contender once (a block of
  calls lasting >= 50 ms), in a rotating order, so that load from other processes on a shared
  machine lands on all of them alike; the median is over rounds. A block during which other
  processes took > 10% of the CPU (from /proc/stat, less this process's own time) is timed
  again (twice at most) and the fraction still disturbed is reported as `contended`.
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
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.utils.benchmark as tbench


@dataclass(frozen=True)
class Settings:
    warmup: int          # CPU: calls before timing
    min_reps: int        # at least this many timed repeats (CPU: interleaved rounds)
    min_time_s: float    # CPU: at least this much timed time per contender
    warmup_ms: int       # GPU: do_bench warm-up time
    rep_ms: int          # GPU: do_bench repetition time
    retries: int = 2     # CPU: a disturbed block is timed again up to this many times


QUICK = Settings(warmup=1, min_reps=5, min_time_s=0.2, warmup_ms=10, rep_ms=40)
FULL = Settings(warmup=2, min_reps=10, min_time_s=1.0, warmup_ms=25, rep_ms=100)


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def setup_threads(device: torch.device, threads: int | None = None) -> int:
    """On CPU, one torch thread per core (more only oversubscribe the cores); returns the count used."""
    if device.type == "cpu":
        torch.set_num_threads(threads or machine_cores())
    return torch.get_num_threads()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_group(fns: dict, device: torch.device, settings: Settings) -> dict:
    """{name: (median ms, repeats, contended fraction)} for callables measured alike.

    CPU: interleaved rounds (see the module docstring). A block during which other processes
    (or the hypervisor) took more than CONTENDED of the CPU is timed again, up to twice, and
    the least disturbed try is kept; the fraction of kept blocks still disturbed is returned.
    """
    if device.type == "cuda":
        return {name: (*_time_cuda(fn, device, settings), None) for name, fn in fns.items()}
    names = list(fns)
    per_call, number, timers = {}, {}, {}
    for name in names:  # warm-up, and the estimate that sizes each block
        start = time.perf_counter()
        for _ in range(settings.warmup):
            fns[name]()
        per_call[name] = max((time.perf_counter() - start) / settings.warmup, 1e-7)
        number[name] = max(1, math.ceil(BLOCK_S / per_call[name]))
        timers[name] = tbench.Timer(stmt="fn()", globals={"fn": fns[name]}, num_threads=torch.get_num_threads())
    round_s = sum(per_call[n] * number[n] for n in names)
    rounds = max(settings.min_reps, math.ceil(settings.min_time_s / max(round_s, 1e-9)))
    rounds = min(rounds, max(settings.min_reps, 200))
    times = {name: [] for name in names}
    disturbed = {name: 0 for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            best = None
            for _ in range(1 + settings.retries):
                meter = Interference()
                seconds = timers[name].timeit(number[name]).median
                share = meter.share()
                if best is None or share < best[1]:
                    best = (seconds, share)
                if share <= CONTENDED:
                    break
            times[name].append(best[0])
            disturbed[name] += best[1] > CONTENDED
    return {name: (1e3 * statistics.median(t), len(t) * number[name], disturbed[name] / len(t))
            for name, t in times.items()}


BLOCK_S = 0.05      # a timed block lasts at least this long (10 ms jiffies resolve it)
CONTENDED = 0.10    # others' share of the CPU above which a block counts as disturbed


class Interference:
    """Share of this machine's CPU time that went to other processes or the hypervisor
    (steal) between construction and `share()`: busy jiffies from /proc/stat less our own."""

    def __init__(self):
        self.start = (time.perf_counter(), _busy_seconds(), _own_seconds())

    def share(self) -> float:
        wall0, busy0, own0 = self.start
        wall, busy, own = time.perf_counter() - wall0, _busy_seconds() - busy0, _own_seconds() - own0
        if busy is None or wall <= 0:
            return 0.0
        return max(0.0, (busy - own) / (wall * machine_cores()))


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds():
    """Busy CPU seconds of the whole machine (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


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
    warmup = max(settings.warmup_ms, estimate)
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


def calibrate(device: torch.device, dtype: torch.dtype) -> Roof:
    """This machine's achievable GEMM rate and copy bandwidth (the floor's units): best of repeats."""
    if device.type == "cuda":
        m = n = k = 8192
        copy_elems = 1 << 28
    else:
        m, n, k = 2048, 2816, 1024  # the cpu-medium GEMM itself: the most favourable case
        copy_elems = 1 << 26
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    src = torch.randn(copy_elems, device=device).to(dtype)
    dst = torch.empty_like(src)
    gemm = _best_ms(lambda: a @ b, device)
    copy = _best_ms(lambda: dst.copy_(src), device)
    return Roof(2.0 * m * n * k / (gemm / 1e3), 2.0 * src.numel() * src.element_size() / (copy / 1e3))


def _best_ms(fn, device, warmup: int = 3, reps: int = 10) -> float:
    """The fastest of `reps` calls after `warmup`: a rate the hardware is known to reach."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            synchronize(device)
            best = min(best, start.elapsed_time(end))
        return best
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return 1e3 * min(timer.timeit(1).median for _ in range(reps))
