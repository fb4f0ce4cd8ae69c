"""A run folder is all old or all new: each (method, seed) is written into a fresh folder beside
its final place and renamed into place only when complete (results.json last), and results.json
records a sha256 of the adapter files so a later run can tell that they are the ones it describes.

Layout beside `<method>/seed<N>` (all in the same parent, so every rename stays on one file system):
- `.seed<N>.new-<pid>-<rand>`: a run being written; left behind only by a crash.
- `.seed<N>.old-<pid>-<rand>`: the previous folder during the swap; removed right after.
- `.seed<N>.lock`: the run's lock file (runlock.py).
Leftover `.new-` and `.old-` folders belong to dead processes once the lock is held: removed then.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil

from ..io import default_file_mode

ADAPTER_PREFIX = "adapter_"  # adapter_model.safetensors, adapter_config.json (not PEFT's README.md)


def _sibling(run_folder: str, kind: str) -> str:
    parent, name = os.path.split(os.path.normpath(run_folder))
    return os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def fresh_dir(run_folder: str) -> str:
    """A new empty folder beside `run_folder`, created with the user's umask (mkdtemp would make it 0700)."""
    path = _sibling(run_folder, "new")
    os.makedirs(path)
    return path


def remove_leftovers(run_folder: str) -> list[str]:
    """Remove `.new-` / `.old-` folders of `run_folder` left by crashed runs (call with its lock held)."""
    parent, name = os.path.split(os.path.normpath(run_folder))
    if not os.path.isdir(parent):
        return []
    gone = [os.path.join(parent, n) for n in sorted(os.listdir(parent))
            if n.startswith((f".{name}.new-", f".{name}.old-"))]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def swap_in(new: str, run_folder: str) -> None:
    """Replace `run_folder` by the complete folder `new`.

    Two renames: a crash between them leaves no `run_folder` at all (plus an `.old-` folder),
    which the next run reads as "not done" and reruns; at no moment does `run_folder` mix files
    of two runs."""
    if os.path.lexists(run_folder):
        old = _sibling(run_folder, "old")
        os.rename(run_folder, old)
        os.rename(new, run_folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, run_folder)


def relocate(paths: dict, src: str, dst: str) -> dict:
    """Paths written under `src` as they read once `src` is renamed to `dst`."""
    return {k: os.path.join(dst, os.path.relpath(v, src)) if v else v for k, v in paths.items()}


def adapter_digest(adapter_folder: str) -> dict[str, str]:
    """sha256 of each adapter file (name -> hex digest)."""
    out = {}
    for name in sorted(os.listdir(adapter_folder)):
        path = os.path.join(adapter_folder, name)
        if name.startswith(ADAPTER_PREFIX) and os.path.isfile(path):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[name] = h.hexdigest()
    return out


def check_adapter_digest(adapter_folder: str, recorded: dict, results_path: str) -> None:
    """ValueError unless the adapter files are exactly those `results_path` recorded."""
    found = adapter_digest(adapter_folder) if os.path.isdir(adapter_folder) else {}
    bad = sorted(n for n in set(found) | set(recorded) if found.get(n) != recorded.get(n))
    if bad:
        raise ValueError(f"{adapter_folder}: {', '.join(bad)} differ from the sha256 recorded in {results_path} "
                         "(changed or replaced after that run finished), so its results no longer describe "
                         "this adapter; rerun with --force or remove the run folder")


def chmod_default(folder: str) -> None:
    """Give every file in `folder` the user's default mode (safetensors writes 0600)."""
    mode = default_file_mode()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, mode)
