"""Atomic writes: an interrupted save never leaves a half-written adapter file."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


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
        for name in file_names:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        for name in file_names:
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
