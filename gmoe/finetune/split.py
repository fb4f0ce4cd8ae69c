"""Deterministic train / held-out split of a validation set (the only split the packages ship).

A fixed split seed, independent of the training seeds, shuffles the row indices once; the first
part trains, the rest evaluates. The same (n, seed, size) always gives the same split.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

DEFAULT_SPLIT_SEED = 1234
DEFAULT_EVAL_FRACTION = 0.5


@dataclass(frozen=True)
class Split:
    train: tuple[int, ...]
    eval: tuple[int, ...]
    seed: int
    source_size: int

    def info(self) -> dict:
        d = asdict(self)
        return {"train_size": len(d.pop("train")), "eval_size": len(d.pop("eval")), "split_seed": self.seed,
                "source_size": self.source_size}


def split_indices(n: int, seed: int = DEFAULT_SPLIT_SEED, eval_fraction: float | None = DEFAULT_EVAL_FRACTION,
                  eval_size: int | None = None) -> Split:
    """Shuffle range(n) with `random.Random(seed)`; `eval_size` rows (or round(eval_fraction * n))
    are held out for evaluation, the rest train. Both parts keep the shuffled order."""
    if n < 2:
        raise ValueError(f"cannot split {n} rows into a training and an evaluation part")
    if eval_size is None:
        if eval_fraction is None or not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction {eval_fraction} must be in (0, 1)")
        eval_size = round(eval_fraction * n)
    eval_size = min(max(int(eval_size), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return Split(train=tuple(order[eval_size:]), eval=tuple(order[:eval_size]), seed=seed, source_size=n)
