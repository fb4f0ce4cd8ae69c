"""A run's checkpoints, for resuming it after a crash or a preemption.

Layout beside the run folder `<method>/seed<N>` (same parent, so every rename stays on one file system):

    .seed<N>.checkpoints/
        checkpoint-<step>/        Trainer's layout: the adapter, optimizer.pt, scheduler.pt,
                                  rng_state[_<rank>].pth (every rank's), trainer_state.json, plus
                                  checkpoint.json (written last: the step, the job's own state, and
                                  the sha256 of every other file)
        .staging/checkpoint-<step>/   a checkpoint being written; renamed into place when complete

A checkpoint is written into `.staging/` by every rank, and only when all have written their part does
rank 0 write `checkpoint.json` and rename the folder into place: a crash at any moment leaves either
the complete checkpoint or none. Older checkpoints beyond `--save-total-limit` are removed after the new
one is in place. A rerun resumes from the newest checkpoint whose files match their recorded sha256; a
partial or corrupt one is skipped with a message, never loaded. The folder is removed once the run's
results are in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from .report import write_json

MANIFEST = "checkpoint.json"
FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_root(run_folder: str) -> str:
    parent, name = os.path.split(os.path.normpath(run_folder))
    return os.path.join(parent, f".{name}.checkpoints")


def staging_dir(root: str) -> str:
    return os.path.join(root, ".staging")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for here, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(here, n), folder) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def commit(root: str, step: int, state: dict, keep: int | None) -> str:
    """Rank 0, once every rank has written its part into `.staging/checkpoint-<step>`: write the manifest,
    rename the folder into place, then remove all but the newest `keep` checkpoints. Returns its path."""
    staged = os.path.join(staging_dir(root), f"checkpoint-{step}")
    manifest = {"format": FORMAT, "step": step, "state": state,
                "files": {f: _sha256(os.path.join(staged, f)) for f in _files(staged)}}
    write_json(os.path.join(staged, MANIFEST), manifest)
    final = os.path.join(root, f"checkpoint-{step}")
    if os.path.lexists(final):  # a checkpoint of the same step from an interrupted earlier attempt
        shutil.rmtree(final)
    os.rename(staged, final)
    if keep is not None and keep > 0:
        for _, path in steps(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def steps(root: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint folders in place, oldest first (complete or not: see `newest`)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _NAME.match(n))]
    return sorted(found)


def problem(path: str) -> str | None:
    """Why the checkpoint folder cannot be resumed from, or None when its files are the recorded ones."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return f"no {MANIFEST} (written last: the checkpoint is partial)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is not a checkpoint manifest of format {FORMAT}"
    found = set(_files(path))
    missing = sorted(set(manifest["files"]) - found)
    if missing:
        return f"missing {', '.join(missing)}"
    extra = sorted(found - set(manifest["files"]))
    if extra:
        return f"files not in its manifest: {', '.join(extra)}"
    changed = [f for f, digest in manifest["files"].items() if _sha256(os.path.join(path, f)) != digest]
    if changed:
        return f"{', '.join(changed)} differ from the sha256 recorded in {MANIFEST} (corrupt or changed)"
    return None


def newest(root: str, log=print) -> tuple[str, dict] | None:
    """(path, manifest) of the newest checkpoint that passes `problem`; the ones skipped are logged."""
    for step, path in reversed(steps(root)):
        why = problem(path)
        if why is None:
            with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
                return path, json.load(f)
        log(f"skipping checkpoint {path} (step {step}): {why}")
    return None


def remove(root: str) -> None:
    shutil.rmtree(root, ignore_errors=True)
