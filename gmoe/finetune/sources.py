"""`--dataset`: a Hugging Face hub dataset id (with `--dataset-config`) or a local `save_to_disk` folder
(a `DatasetDict`, or a single split), read into plain row dicts per split.

Hub ids go through `datasets.load_dataset(id, config, split=...)` (the Hugging Face cache; offline with
HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); local folders through `datasets.load_from_disk`.
"""
from __future__ import annotations

import os

#: the dataset lm-evaluation-harness 0.4.x scores each task on (its task YAML's dataset_path / dataset_name)
HARNESS_DATASETS = {
    "arc-c": ("allenai/ai2_arc", "ARC-Challenge"),
    "arc-e": ("allenai/ai2_arc", "ARC-Easy"),
    "boolq": ("aps/super_glue", "boolq"),
    "obqa": ("allenai/openbookqa", "main"),
    "siqa": ("lighteval/siqa", None),
    "piqa": ("baber/piqa", None),
    "hellaswag": ("Rowan/hellaswag", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
}


def _rows(dataset) -> list[dict]:
    return [dict(r) for r in dataset]


def load_splits(name: str, config: str | None, train_split: str, eval_split: str) -> tuple[dict, str]:
    """({split name: rows} holding `eval_split` and, when the source has it, `train_split`; the source
    kind: "local DatasetDict", "local single split" (its rows under `eval_split`) or "hub")."""
    import datasets

    if os.path.isdir(name):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if eval_split not in loaded:
                raise ValueError(f"--dataset {name} has no split {eval_split!r} (it has {sorted(loaded)}): "
                                 "pass --eval-split")
            return {s: _rows(loaded[s]) for s in (train_split, eval_split) if s in loaded}, "local DatasetDict"
        return {eval_split: _rows(loaded)}, "local single split"
    if os.path.exists(name) or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--dataset {name} is not a folder written by datasets' save_to_disk")
    out = {}
    for split in (eval_split, train_split):
        try:
            out[split] = _rows(datasets.load_dataset(name, config, split=split))
        except ValueError as err:  # datasets: 'Unknown split "train". Should be one of [...]'
            if split == eval_split or "split" not in str(err).lower():
                raise ValueError(f"--dataset {name} (config {config}) split {split!r}: {err}") from err
        except (OSError, ConnectionError) as err:
            raise ValueError(f"--dataset {name} (config {config}) could not be loaded from the Hugging Face hub "
                             f"({err}); offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) only the cache is read: "
                             "save it with save_to_disk where there is a network and pass that folder") from err
    return out, "hub"


def dataset_examples(cfg, task) -> tuple[list, list, dict]:
    """(training examples, held-out examples, split record) of `--dataset`: with its train split the
    job trains on it and scores --eval-split; without one, --eval-split is cut in two (split.py)."""
    from .split import split_indices
    from .tasks import to_examples

    splits, kind = load_splits(cfg.dataset, cfg.dataset_config, cfg.train_split, cfg.eval_split)
    source = cfg.dataset + (f" ({cfg.dataset_config})" if cfg.dataset_config else "")
    held_rows = splits[cfg.eval_split]
    if cfg.train_split in splits:
        train = to_examples(task, splits[cfg.train_split], f"{source} {cfg.train_split}")
        held = to_examples(task, held_rows, f"{source} {cfg.eval_split}")
        return train, held, {"source": source, "kind": kind, "case": "given splits", "train_split": cfg.train_split,
                             "eval_split": cfg.eval_split, "train_size": len(train), "eval_size": len(held),
                             "split_seed": None}
    examples = to_examples(task, held_rows, f"{source} {cfg.eval_split}")
    s = split_indices(len(examples), cfg.split_seed, cfg.eval_fraction, cfg.eval_size)
    return ([examples[i] for i in s.train], [examples[i] for i in s.eval],
            {"source": source, "kind": kind, "case": "cut validation", "eval_split": cfg.eval_split, **s.info(),
             "eval_fraction": cfg.eval_fraction,
             "note": f"no {cfg.train_split!r} split: {cfg.eval_split!r} is cut into a training and a held-out part"})
