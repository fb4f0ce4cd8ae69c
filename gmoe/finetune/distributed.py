"""The job on several processes (torchrun, accelerate launch; DDP, FSDP2, DeepSpeed): who this process
is, and the few collectives through which rank 0's decisions reach the others.

Rank 0 decides (claim, skip, resume step) and the other ranks follow through `broadcast`, never through
the file system. Every phase that can fail on one rank only (arguments, data, model, a run) ends in
`agree`: the ranks exchange their outcome, and if any failed, every rank raises with the failing rank's
message, so all of them exit non-zero together instead of waiting in the next collective.

The control collectives run on a gloo group of their own, on CPU tensors: they never wait for a GPU
stream, so the per-step preemption check is no host sync. Every collective has the process group's
timeout (`GMOE_DIST_TIMEOUT` seconds, default 600), so a rank that dies without a word (SIGKILL, a lost
node) ends the others within that bound; the launcher (torchrun's elastic agent) usually ends them
sooner, as soon as it sees one worker exit.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

TIMEOUT_ENV = "GMOE_DIST_TIMEOUT"


class PeerFailed(RuntimeError):
    """Another rank failed in a phase this rank finished: its message, to end this rank too."""


@dataclass(frozen=True)
class Ranks:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    engine: str = "single"  # single, ddp, fsdp2, deepspeed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        """This rank's own device: cuda:LOCAL_RANK when a GPU is there (never plain "cuda"), else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def shard(self, n: int) -> range:
        """This rank's contiguous share of n items (the first n % world_size ranks take one more)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def from_env() -> Ranks:
    """This process's place, from the launcher's environment (torchrun and accelerate set the same)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        engine = "deepspeed"
    elif _env_flag("ACCELERATE_USE_FSDP"):
        engine = "fsdp" + os.environ.get("FSDP_VERSION", "1")
    else:
        engine = "ddp"
    return Ranks(world_size=world, rank=int(os.environ.get("RANK", "0")),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")), engine=engine)


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "600")
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be positive")
    return datetime.timedelta(seconds=seconds)


_CONTROL = None  # the gloo group of the control collectives


def init(ranks: Ranks) -> None:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPUs) and make the control group; pin
    this rank's GPU. Nothing to do in one process."""
    global _CONTROL
    if not ranks.distributed or _CONTROL is not None:
        return
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout())
    _CONTROL = dist.new_group(backend="gloo", timeout=timeout())


def shutdown(ranks: Ranks) -> None:
    """Leave the process groups once every rank has finished its collectives (a job's normal end).
    Without it, gloo's worker threads outlive the interpreter's teardown and a rank can abort at
    exit (SIGABRT, "terminate called without an active exception") after all its work is done.
    Not called on a failure, where a peer may still be inside a collective."""
    global _CONTROL
    if not ranks.distributed or _CONTROL is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


def broadcast(ranks: Ranks, value=None):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    box = [value if ranks.is_main else None]
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def gather(ranks: Ranks, value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    import torch.distributed as dist

    out = [None] * ranks.world_size
    dist.all_gather_object(out, value, group=_CONTROL)
    return out


def any_rank(ranks: Ranks, flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a CPU all-reduce: no GPU stream waits)."""
    if not ranks.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return bool(t.item())


def agree(ranks: Ranks, phase: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) on every rank, then an exchange of outcomes: this rank's exception is re-raised
    here; another rank's ends this one with PeerFailed naming that rank and its message."""
    try:
        result, failure = fn(*args, **kwargs), None
    except Exception as err:  # noqa: BLE001 - every failure must reach the other ranks before it ends this one
        result, failure = None, err
    if not ranks.distributed:
        if failure is not None:
            raise failure
        return result
    outcomes = gather(ranks, None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    for rank, message in enumerate(outcomes):
        if message is not None:
            raise PeerFailed(f"rank {rank} failed in {phase}: {message}")
    return result


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier(group=_CONTROL)
