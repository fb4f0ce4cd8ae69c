"""GMoETrainer: transformers.Trainer that saves and resumes checkpoints as GMoE adapters.

Plain `Trainer` trains a GMoEModel unchanged, but it saves a model that is not a
PreTrainedModel as one full state dict (and fails on tied embeddings), and it cannot resume
from an adapter folder. This subclass writes `adapter_config.json` + `adapter_model.safetensors`
into each checkpoint and reads them back on `train(resume_from_checkpoint=...)` and for
`load_best_model_at_end`: adapter weights and the router state (λ, σ, expert graph, running
load). Trainer itself restores optimizer, scheduler, RNG and data position from the same folder.

The hooks overridden, `_load_from_checkpoint(resume_from_checkpoint, model=None)` and
`_load_best_model()`, have these names and signatures in transformers 4.46 to 5.24. Under FSDP
and DeepSpeed Trainer loads checkpoints through the engine instead of these hooks.

`GMoESFTTrainer` (needs `trl`) is TRL's `SFTTrainer` with the same checkpoints. TRL >= 1 computes
the SFT loss itself from a fused LM head that it patches onto the model, so the model's own
`loss` (where the router loss lives) is never used: this class puts the fused head on the wrapped
Hugging Face model (under the GMoE layers) and adds `outputs["router_loss"]` to TRL's loss.

Note: Trainer's label smoother and `compute_loss_func` compute the loss from the logits
and never see `out.loss`; with them, add `outputs["router_loss"]` in your loss function.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from pathlib import Path

import torch
import transformers

from .config import WEIGHTS_NAME, GMoEConfig
from .io import read_safetensors
from .model import GMoEModel

# Fields that decide what the adapter computes: a checkpoint that differs in one of them is
# another adapter. The loss coefficients and dropout may be changed for the resumed run.
_STRUCTURE = ("num_experts", "top_k", "r", "lora_alpha", "router", "gcn_layers", "gcn_dim",
              "target_modules", "expert_modules")


def load_checkpoint_adapter(model: GMoEModel, checkpoint: str | os.PathLike) -> None:
    """Load the adapter folder `checkpoint` into `model` in place, all or nothing."""
    saved = GMoEConfig.load(checkpoint)
    ours = model.gmoe_config
    differ = [f for f in _STRUCTURE if getattr(saved, f) != getattr(ours, f)]
    if differ:
        raise ValueError(f"checkpoint {checkpoint} was trained with another GMoE config: "
                         + ", ".join(f"{f}={getattr(saved, f)!r} (this model: {getattr(ours, f)!r})" for f in differ))
    changed = [f.name for f in dataclasses.fields(GMoEConfig)
               if f.name not in (*_STRUCTURE, "backend", "base_model_name_or_path")
               and getattr(saved, f.name) != getattr(ours, f.name)]
    if changed:
        warnings.warn(f"resuming from {checkpoint} with changed settings {changed}: this run's values are used",
                      stacklevel=2)
    weights = Path(checkpoint, WEIGHTS_NAME)
    model.load_adapter_state_dict(read_safetensors(weights), source=str(weights))


class GMoETrainer(transformers.Trainer):
    """Trainer whose checkpoints are GMoE adapter folders, and whose training logs carry the
    routing telemetry: at each logging step, the means over layers of `GMoEModel.routing_stats()`
    as `routing/<field>`, and the full per-layer record in `routing_history`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routing_history: list[dict] = []  # {"step": ..., **RoutingStats.to_dict()} per training log

    def _gmoe_model(self, model=None) -> GMoEModel | None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return model if isinstance(model, GMoEModel) else None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self._gmoe_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            model.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def log(self, logs, *args, **kwargs) -> None:
        model = self._gmoe_model()
        if model is not None:  # the warning the training step defers (no host sync there); Trainer syncs here
            model.report_non_finite()
            if "loss" in logs and model.routing_telemetry:  # a training-step log (not eval, not the run summary)
                stats = model.routing_stats()
                if stats.tokens:
                    self.routing_history.append({"step": self.state.global_step, **stats.to_dict()})
                    logs.update({f"routing/{k}": round(v, 4) for k, v in stats.summary().items()
                                 if v is not None and k != "tokens"})
        return super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        gmoe_model = self._gmoe_model(model)
        if gmoe_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_adapter(gmoe_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        gmoe_model = self._gmoe_model()
        if gmoe_model is None:
            return super()._load_best_model()
        load_checkpoint_adapter(gmoe_model, self.state.best_model_checkpoint)


@functools.cache
def _gmoe_sft_trainer():
    import trl
    import trl.trainer.sft_trainer as sft_module

    class GMoESFTTrainer(GMoETrainer, trl.SFTTrainer):
        """trl.SFTTrainer for a GMoEModel: the router loss joins TRL's loss; checkpoints are adapters."""

        def __init__(self, *args, **kwargs):
            self._router_loss_outside = False  # True once TRL computes the loss from its fused head
            fuse = getattr(sft_module, "add_fused_lm_head", None)  # TRL >= 1 patches the model's forward

            def fuse_under_gmoe(model, *fuse_args, **fuse_kwargs):
                if isinstance(model, GMoEModel):
                    self._router_loss_outside = True
                    model = model.base_model  # GMoEModel.forward passes fused_lm_head=True on to it
                return fuse(model, *fuse_args, **fuse_kwargs)

            if fuse is not None:
                sft_module.add_fused_lm_head = fuse_under_gmoe
            try:
                super().__init__(*args, **kwargs)
            finally:
                if fuse is not None:
                    sft_module.add_fused_lm_head = fuse
            if self._router_loss_outside and (self.compute_loss_func is not None or self.label_smoother is not None):
                # TRL then runs the model twice per batch (loss, then metrics): the load would count twice.
                raise ValueError("GMoESFTTrainer does not support compute_loss_func or label_smoothing_factor > 0: "
                                 "TRL runs the model a second time for its metrics, which would count the expert "
                                 "load twice")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._router_loss_outside:  # older TRL: the loss is the model's, router loss included
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # The router loss of the forward that gives TRL's loss. (Asked for outputs, TRL runs the model
            # once more without grad; that second router loss carries no gradient.)
            router_losses = []
            hook = self._gmoe_model(model).register_forward_hook(
                lambda module, args, out: router_losses.append(out.get("router_loss")))
            try:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                hook.remove()
            loss, outputs = result if return_outputs else (result, None)
            if router_losses and router_losses[0] is not None:
                router_loss = router_losses[0]
                # A per-micro-batch mean, like TRL's MoE aux loss: when the SFT loss is normalised by the
                # tokens of all accumulated micro-batches, Trainer no longer divides by their number.
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + router_loss.to(loss.dtype) / steps
                mode = "train" if model.training else "eval"
                self._metrics[mode]["router_loss"].append(router_loss.item())
            return (loss, outputs) if return_outputs else loss

    return GMoESFTTrainer


def __getattr__(name):
    if name == "GMoESFTTrainer":  # built on first use: trl is an optional dependency
        return _gmoe_sft_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
