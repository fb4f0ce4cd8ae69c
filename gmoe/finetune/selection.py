"""Checkpoint selection (`--eval-steps N --select best|final`): the adapter is scored on the selection set
every N optimizer steps and after the last step; with `best`, the trainable state of the highest
selection-set acc (the earlier step on a tie) is kept in memory and put back before the final scoring
and saving, as the GMoE paper picks its checkpoints. The state copied is the adapter's own: GMoE's
`adapter_state_dict()` (weights, router, λ, σ, graph and running load) or PEFT's
`get_peft_model_state_dict`."""
from __future__ import annotations

import time

from transformers import TrainerCallback


def adapter_state(model) -> dict:
    """A copy of the model's adapter tensors (on their device), unaffected by further training."""
    if hasattr(model, "adapter_state_dict"):
        state = model.adapter_state_dict()
    else:
        import peft

        state = peft.get_peft_model_state_dict(model)
    return {k: v.detach().clone() for k, v in state.items()}


def load_adapter_state(model, state: dict) -> None:
    """Put an `adapter_state` copy back into the model."""
    if hasattr(model, "load_adapter_state_dict"):
        model.load_adapter_state_dict(state, "the selected step's adapter")
        return
    import peft

    result = peft.set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"restoring the selected adapter left keys unused: {unexpected[:5]}")


class Selector(TrainerCallback):
    """Scores `model` with `score(model) -> {"acc", "acc_norm", ...}` after every `eval_steps`-th optimizer
    step and after the last; with `keep_best` holds a copy of the best-scoring step's adapter state."""

    def __init__(self, model, score, eval_steps: int, keep_best: bool, log=None):
        self.model, self.score, self.eval_steps, self.keep_best, self.log = model, score, eval_steps, keep_best, log
        self.curve: list[dict] = []
        self.best: dict | None = None
        self.seconds = 0.0
        self._state: dict | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps == 0:
            self.record(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.curve or self.curve[-1]["step"] != state.global_step:
            self.record(state.global_step)

    def record(self, step: int) -> dict:
        start = time.perf_counter()
        res = self.score(self.model)
        point = {"step": step, "acc": res["acc"], "acc_norm": res["acc_norm"]}
        if "tasks" in res:
            point["tasks"] = {t: {"acc": r["acc"], "acc_norm": r["acc_norm"]} for t, r in res["tasks"].items()}
        self.curve.append(point)
        if self.best is None or point["acc"] > self.best["acc"]:  # strictly: a tie keeps the earlier step
            self.best = point
            if self.keep_best:
                self._state = adapter_state(self.model)
        self.seconds += time.perf_counter() - start
        if self.log is not None:
            self.log(f"step {step}: selection acc {point['acc']:.4f}  acc_norm {point['acc_norm']:.4f}")
        return point

    def restore_best(self) -> None:
        """Put the best step's adapter back (with keep_best; a no-op when the last step was the best)."""
        if self._state is not None and self.best["step"] != self.curve[-1]["step"]:
            load_adapter_state(self.model, self._state)
        self._state = None

    def state(self) -> tuple[dict, dict | None]:
        """(the curve, best step and seconds as JSON; the kept adapter tensors, or None): what a checkpoint
        holds so that a resumed run selects as an uninterrupted one."""
        return {"curve": self.curve, "best": self.best, "seconds": self.seconds}, self._state

    def load_state(self, record: dict, tensors: dict | None) -> None:
        self.curve, self.best, self.seconds = list(record["curve"]), record["best"], float(record["seconds"])
        self._state = tensors if self.keep_best else None

    def result(self, select: str, size: int, final_step: int, info: dict | None = None) -> dict:
        """The `selection` record of a result: which step's adapter was kept, and the curve it was chosen on."""
        step = self.best["step"] if select == "best" and self.best else final_step
        return {"select": select, "step": step, "eval_steps": self.eval_steps, "size": size, "curve": self.curve,
                "best_step": self.best["step"] if self.best else None, "seconds": self.seconds, **(info or {})}


def no_selection(final_step: int) -> dict:
    """The `selection` record of a run without --eval-steps: the last step's adapter, no curve."""
    return {"select": "final", "step": final_step, "eval_steps": None, "size": 0, "curve": []}
