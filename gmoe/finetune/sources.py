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


#: --train-split's default: a dataset without a split of this name has its --eval-split cut in two
DEFAULT_TRAIN_SPLIT = "train"


def _no_split(name: str, split: str, flag: str, found) -> ValueError:
    """A named split the dataset lacks: an error listing the splits it has."""
    cut = (" (to cut --eval-split in two instead, leave --train-split unset)" if flag == "--train-split" else "")
    return ValueError(f"--dataset {name} has no split {split!r} (it has {found}): pass one of them as {flag}{cut}")


def load_splits(name: str, config: str | None, train_split: str, eval_split: str) -> tuple[dict, str]:
    """({split name: rows} holding `eval_split` and, when the source has it, `train_split`; the source
    kind: "local DatasetDict", "local single split" (its rows under `eval_split`) or "hub").
    Only the default training split may be missing (the evaluation split is then cut in two): a
    --train-split or --eval-split named that does not exist is a ValueError listing those that do."""
    import datasets

    if os.path.isdir(name):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            for flag, split in (("--eval-split", eval_split), ("--train-split", train_split)):
                if split not in loaded and (flag == "--eval-split" or split != DEFAULT_TRAIN_SPLIT):
                    raise _no_split(name, split, flag, sorted(loaded))
            return {s: _rows(loaded[s]) for s in (train_split, eval_split) if s in loaded}, "local DatasetDict"
        if train_split != DEFAULT_TRAIN_SPLIT:
            raise ValueError(f"--dataset {name} is a single split (a save_to_disk folder of one Dataset, without "
                             f"split names), so --train-split {train_split!r} names nothing: leave --train-split "
                             "unset (the split is cut in two), or save a DatasetDict with that split")
        return {eval_split: _rows(loaded)}, "local single split"
    if os.path.exists(name) or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--dataset {name} is not a folder written by datasets' save_to_disk")
    out = {}
    for split in (eval_split, train_split):
        try:
            out[split] = _rows(datasets.load_dataset(name, config, split=split))
        except ValueError as err:  # datasets: 'Unknown split "train". Should be one of [...]'
            missing_split = "split" in str(err).lower()
            if split == train_split != eval_split and missing_split and split != DEFAULT_TRAIN_SPLIT:
                raise _no_split(f"{name} (config {config})", split, "--train-split", _listed(str(err))) from err
            if split == eval_split or not missing_split:
                raise ValueError(f"--dataset {name} (config {config}) split {split!r}: {err}") from err
        except (OSError, ConnectionError) as err:
            raise ValueError(f"--dataset {name} (config {config}) could not be loaded from the Hugging Face hub "
                             f"({err}); offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) only the cache is read: "
                             "save it with save_to_disk where there is a network and pass that folder") from err
    return out, "hub"


def _listed(message: str) -> str:
    """The splits datasets' error lists ("Should be one of ['train', 'validation']"), else the message."""
    start = message.find("[")
    return message[start:message.find("]", start) + 1] if start >= 0 and "]" in message[start:] else message


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
