"""Training on `transformers.Trainer`: the logging of task loss and router loss (the routing
telemetry comes from GMoETrainer), and the TrainingArguments the job uses (identical for every method)."""
from __future__ import annotations

import inspect

import torch
import transformers

from ..trainer import GMoETrainer


class FinetuneTrainer(GMoETrainer):
    """GMoETrainer (adapter checkpoints and routing telemetry for GMoE models; plain Trainer
    behaviour otherwise) that records, between two log steps, the mean task loss, the mean router
    loss and the non-padding tokens seen."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._window = {"task": 0.0, "router": 0.0, "n": 0}
        self.train_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"]
        router = outputs.get("router_loss") if hasattr(outputs, "get") else None
        router_value = float(router.detach()) if router is not None else 0.0
        self._window["task"] += float(loss.detach()) - router_value
        self._window["router"] += router_value
        self._window["n"] += 1
        if model.training and "attention_mask" in inputs:
            self.train_tokens += int(inputs["attention_mask"].sum())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._window["n"]:
            n = self._window["n"]
            logs["task_loss"] = round(self._window["task"] / n, 6)
            logs["router_loss"] = round(self._window["router"] / n, 6)
            self._window = {"task": 0.0, "router": 0.0, "n": 0}
        super().log(logs, *args, **kwargs)


def precision(dtype: torch.dtype) -> str:
    """The mixed-precision mode that follows from the base model's dtype: bf16, fp16 or no."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def training_arguments(output_dir: str, seed: int, epochs: float, lr: float, batch_size: int, grad_accum: int,
                       warmup_ratio: float, max_steps: int = -1, log_steps: int = 5, dtype: torch.dtype = torch.float32,
                       gradient_checkpointing: bool = False,
                       report_to: str | list[str] = "none") -> transformers.TrainingArguments:
    """The job's TrainingArguments. `dtype` (the base model's) selects bf16 / fp16 mixed precision;
    gradient checkpointing is non-reentrant (the router loss needs the forward's graph)."""
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
    return transformers.TrainingArguments(
        output_dir=output_dir, seed=seed, data_seed=seed, num_train_epochs=epochs, max_steps=max_steps,
        learning_rate=lr, lr_scheduler_type="linear", weight_decay=0.0, **warmup,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum, max_grad_norm=1.0,
        logging_steps=log_steps, logging_first_step=True, save_strategy="no", eval_strategy="no",
        report_to=report_to or "none", use_cpu=use_cpu, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=False, bf16=mode == "bf16", fp16=mode == "fp16",
        **checkpointing,
    )
