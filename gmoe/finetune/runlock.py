"""Who runs a (method, seed): an exclusive `fcntl.flock` on a lock file beside its run folder.

The kernel grants the lock to exactly one process at a time, atomically, and drops it when the
holder exits for any reason (a crash or SIGKILL included). So a lock that cannot be taken
means a live process is running that (method, seed) right now, and nothing left on disk by a
dead process (the lock file itself, the `.running` marker of older versions) can ever block a
run. The lock file is never deleted: a process that opened it before the unlink would lock an
orphaned inode while a newer one locks a fresh file, and both would think they own the run.

The holder writes "pid host start-time" into the lock file, only so that the refusal can say
who holds it; the lock, not the text, decides. flock is per machine on most network file
systems (NFS emulates it with POSIX locks, which do work across hosts on NFSv4).
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from dataclasses import dataclass


class RunBusy(RuntimeError):
    """The lock is held by another live process: the run is skipped, never shared."""


@dataclass
class RunLock:
    path: str
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_path(run_folder: str) -> str:
    """`<parent>/.<name>.lock`: outside the run folder, which is replaced whole when a run finishes."""
    parent, name = os.path.split(os.path.normpath(run_folder))
    return os.path.join(parent, f".{name}.lock")


def claim(run_folder: str, wait: bool = False) -> RunLock:
    """Take the run's lock, or raise RunBusy naming the holder (`wait`: block until it is free)."""
    path = lock_path(run_folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunBusy(f"{run_folder} is being run by {holder(path)} (it holds {path})") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
    except BaseException:  # a full disk: give the lock back rather than hold it for the process's life
        os.close(fd)
        raise
    return RunLock(path, fd)


def holder(path: str) -> str:
    """What the current holder wrote into the lock file (best effort: it may be mid-write)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        text = ""
    return text or "another process"
