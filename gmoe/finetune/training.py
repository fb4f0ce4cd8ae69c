"""Training on `transformers.Trainer`, on one process or several: the job's loss (the task loss as a mean
over every token of the optimizer step on all ranks, plus the router loss), its logging windows, its
checkpoints and its reaction to preemption. The routing telemetry comes from GMoETrainer.

No host sync in the step: the windows of task loss, router loss and training tokens are summed on the
device, and read (and reduced over the ranks) only at logging steps and checkpoints."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import statistics
import time

import torch
import transformers

from ..trainer import GMoETrainer
from . import checkpoints, distributed
from .distributed import Ranks

#: Exit status of a run stopped by SIGTERM after writing a checkpoint: rerun the same command to resume.
PREEMPTED = 75
_JOB_STATE = "job_state-rank{rank}.json"
_SELECTOR = "selector.json"
_SELECTOR_TENSORS = "selector_best.safetensors"


class Preempted(Exception):
    """The run stopped at `step` on SIGTERM after writing the checkpoint `path` (exit status PREEMPTED)."""

    def __init__(self, step: int, path: str | None):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {path}: rerun the same command to resume")
        self.step, self.path = step, path


class FinetuneTrainer(GMoETrainer):
    """GMoETrainer with the job's loss normalisation, device-side logging windows, atomic checkpoints
    (checkpoints.py) holding the job's own state, step timing and a SIGTERM stop."""

    def __init__(self, *args, ranks: Ranks = Ranks(), checkpoint_root: str | None = None,
                 save_total_limit: int | None = None, selector=None, **kwargs):
        super().__init__(*args, **kwargs)
        # Trainer then counts the step's label tokens over every micro-batch and rank (num_items_in_batch),
        # which compute_loss hands to the base model's LM loss; the router loss it averages itself.
        self.model_accepts_loss_kwargs = True
        self.ranks, self.checkpoint_root, self.save_total_limit, self.selector = (
            ranks, checkpoint_root, save_total_limit, selector)
        self._window = None  # [task loss sum, router loss sum] on the device
        self._micro = 0  # micro-batches in the window
        self._token_mean = False  # the task loss was normalised by the step's global token count
        self._tokens = None  # this rank's non-padding training tokens, on the device
        self._tokens_before = 0  # this rank's tokens of the steps before a resume
        self.step_seconds: list[float] = []
        self.stop = StopOnSignal(ranks)
        self.add_callback(self.stop)
        self.add_callback(_StepClock(self.step_seconds))

    # ----- the loss -----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        token_mean = num_items_in_batch is not None
        outputs = model(**inputs, **({"num_items_in_batch": num_items_in_batch} if token_mean else {}))
        loss = outputs["loss"]
        router = outputs.get("router_loss") if hasattr(outputs, "get") else None
        router = loss.new_zeros(()) if router is None else router
        task = loss - router
        if token_mean:
            # task: this rank's token-loss sum over the step's token count on every rank and micro-batch. The
            # engine averages gradients over the ranks, so it is scaled by them (as Trainer does), and Trainer
            # leaves it unscaled for accumulation; the router loss, global and per micro-batch (it holds the
            # rank weighting of the library's contract already), is averaged over the micro-batches here.
            self._token_mean = True
            loss = task * _ranks_in_loss(self) + router / _accumulation(self)
        window = torch.stack([task.detach().float(), router.detach().float()])
        self._window = window if self._window is None else self._window + window
        self._micro += 1
        if model.training and "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
            self._tokens = count if self._tokens is None else self._tokens + count
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._micro:  # a training log: every rank is here, so reducing is safe
            sums = self._reduce(self._window)
            steps = self._micro / _accumulation(self)
            per_step_ranks = 1 if self._token_mean else self.ranks.world_size
            # the task loss first, the router loss beside it (large at injection: docs/finetune.md), then the rest
            logs = {"task_loss": round(float(sums[0]) / (steps * per_step_ranks), 6),
                    "router_loss": round(float(sums[1]) / (self._micro * self.ranks.world_size), 6), **logs}
            self._window, self._micro = None, 0
        super().log(logs, *args, **kwargs)

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.ranks.distributed:
            return tensor
        return self.accelerator.reduce(tensor.clone(), reduction="sum")

    def train_tokens(self) -> dict:
        """Non-padding training tokens: {"global": over all ranks, "this_launch": of this launch (global)};
        a collective: every rank calls it."""
        local = torch.tensor([self._tokens_before, 0 if self._tokens is None else int(self._tokens)])
        total = sum(torch.tensor(v) for v in distributed.gather(self.ranks, local.tolist()))
        return {"global": int(total.sum()), "this_launch": int(total[1])}

    # ----- checkpoints -----
    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written by every rank into the staging folder, then made complete and
        put in place by rank 0 (checkpoints.commit); the job's state beside it."""
        if self.checkpoint_root is None:
            return
        step = self.state.global_step
        staging = checkpoints.staging_dir(self.checkpoint_root)
        folder = os.path.join(staging, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{step}")
        if self.ranks.is_main:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(staging, exist_ok=True)
        distributed.barrier(self.ranks)
        output_dir = self.args.output_dir
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = output_dir
        self._save_job_state(folder)
        distributed.barrier(self.ranks)
        if self.ranks.is_main:
            checkpoints.commit(self.checkpoint_root, step, {"world_size": self.ranks.world_size,
                                                           "engine": self.ranks.engine}, self.save_total_limit)
        distributed.barrier(self.ranks)

    def _save_job_state(self, folder: str) -> None:
        tokens = self._tokens_before + (0 if self._tokens is None else int(self._tokens))
        window = [] if self._window is None else self._window.tolist()
        state = {"tokens": tokens, "window": window, "micro": self._micro, "token_mean": self._token_mean,
                 "step_seconds": self.step_seconds, "routing_history": self.routing_history}
        _write_json(os.path.join(folder, _JOB_STATE.format(rank=self.ranks.rank)), state)
        if self.selector is not None and self.ranks.is_main:
            record, tensors = self.selector.state()
            _write_json(os.path.join(folder, _SELECTOR), record)
            if tensors is not None:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          os.path.join(folder, _SELECTOR_TENSORS))

    def load_job_state(self, folder: str) -> None:
        """Put back what `_save_job_state` wrote for this rank (call before `train(resume_from_checkpoint)`)."""
        with open(os.path.join(folder, _JOB_STATE.format(rank=self.ranks.rank)), encoding="utf-8") as f:
            state = json.load(f)
        device = self.args.device
        self._tokens_before = int(state["tokens"])
        self._window = torch.tensor(state["window"], device=device) if state["window"] else None
        self._micro, self._token_mean = int(state["micro"]), bool(state["token_mean"])
        self.step_seconds[:] = state["step_seconds"]
        self.routing_history[:] = state["routing_history"]
        if self.selector is not None:
            with open(os.path.join(folder, _SELECTOR), encoding="utf-8") as f:
                record = json.load(f)
            tensors = None
            path = os.path.join(folder, _SELECTOR_TENSORS)
            if os.path.isfile(path):
                from ..io import read_safetensors

                tensors = {k: v.to(device) for k, v in read_safetensors(path).items()}
            self.selector.load_state(record, tensors)

    def median_step_seconds(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None


def _write_json(path: str, data) -> None:
    from .report import write_json

    write_json(path, data)


def _accumulation(trainer) -> int:
    return getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps


def _ranks_in_loss(trainer) -> int:
    """The factor Trainer applies to a loss normalised by a token count gathered over the ranks."""
    return trainer.accelerator.num_processes if getattr(trainer.args, "average_tokens_across_devices", False) else 1


class StopOnSignal(transformers.TrainerCallback):
    """SIGTERM (a scheduler's preemption, torchrun passing it on) sets a flag; at the end of the step the
    ranks agree on it (one CPU all-reduce on the control group, no GPU wait), and if any rank has it,
    every rank saves a checkpoint of that step and stops."""

    def __init__(self, ranks: Ranks):
        self.ranks, self.requested, self.stopped_at = ranks, False, None
        self._previous = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_rank(self.ranks, self.requested):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True


class _StepClock(transformers.TrainerCallback):
    """Wall time from one optimizer step's end to the next (no device sync: in steady state the host cannot
    run ahead of the device by more than a bounded queue, so the median is the device's step time)."""

    def __init__(self, out: list):
        self.out, self._last = out, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.out.append(now - self._last)
        self._last = now


def precision(dtype: torch.dtype) -> str:
    """The mixed-precision mode that follows from the base model's dtype: bf16, fp16 or no."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def per_device_batch(batch_size: int, world_size: int) -> int:
    """--batch-size is the global batch of one micro-step, split evenly over the ranks."""
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} is the global batch of one micro-step and must split evenly "
                         f"over the {world_size} processes: use a multiple of {world_size}")
    return batch_size // world_size


def training_arguments(output_dir: str, seed: int, epochs: float, lr: float, batch_size: int, grad_accum: int,
                       warmup_ratio: float, max_steps: int = -1, log_steps: int = 5, dtype: torch.dtype = torch.float32,
                       gradient_checkpointing: bool = False, report_to: str | list[str] = "none",
                       save_steps: int | None = None, world_size: int = 1) -> transformers.TrainingArguments:
    """The job's TrainingArguments. `batch_size` is global (split over `world_size` ranks); `dtype` (the
    base model's) selects bf16 / fp16 mixed precision; gradient checkpointing is non-reentrant (the router
    loss needs the forward's graph); checkpoints every `save_steps` steps into `output_dir`."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"--warmup-ratio {warmup_ratio} must be in [0, 1)")
    use_cpu = not torch.cuda.is_available()
    # transformers 5 takes a ratio as a float warmup_steps < 1; 4.x has warmup_ratio
    params = inspect.signature(transformers.TrainingArguments.__init__).parameters
    warmup = {"warmup_ratio": warmup_ratio} if "warmup_ratio" in params else {"warmup_steps": float(warmup_ratio)}
    if isinstance(report_to, str):
        report_to = [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"]
    mode = precision(dtype)
    # transformers 5 names it activation_checkpointing (gradient_checkpointing is its deprecated alias)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"
    checkpointing = {ckpt: gradient_checkpointing,
                     f"{ckpt}_kwargs": {"use_reentrant": False} if gradient_checkpointing else None}
    extra = {"average_tokens_across_devices": True} if "average_tokens_across_devices" in params else {}
    return transformers.TrainingArguments(
        output_dir=output_dir, seed=seed, data_seed=seed, num_train_epochs=epochs, max_steps=max_steps,
        learning_rate=lr, lr_scheduler_type="linear", weight_decay=0.0, **warmup,
        per_device_train_batch_size=per_device_batch(batch_size, world_size),
        gradient_accumulation_steps=grad_accum, max_grad_norm=1.0,
        logging_steps=log_steps, logging_first_step=True, eval_strategy="no",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=None,
        report_to=report_to or "none", use_cpu=use_cpu, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=False, bf16=mode == "bf16", fp16=mode == "fp16", ddp_find_unused_parameters=False,
        ddp_timeout=int(distributed.timeout().total_seconds()),
        **checkpointing, **extra,
    )
