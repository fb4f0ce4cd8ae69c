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

Note: Trainer's label smoother and `compute_loss_func` compute the loss from the logits
and never see `out.loss`; with them, add `outputs["router_loss"]` in your loss function.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
import transformers

from .config import WEIGHTS_NAME, GMoEConfig
from .io import load_adapter_into, read_safetensors
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
    load_adapter_into(model, read_safetensors(weights), source=str(weights))


class GMoETrainer(transformers.Trainer):
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
