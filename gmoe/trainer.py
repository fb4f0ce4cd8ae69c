"""GMoETrainer: transformers.Trainer that saves checkpoints as GMoE adapters.

Plain `Trainer` trains a GMoEModel unchanged, but it saves a model that is not a
PreTrainedModel as one full state dict (and fails on tied embeddings). This subclass writes
`adapter_config.json` + `adapter_model.safetensors` into each checkpoint instead; resume by
loading the adapter with `GMoEModel.from_pretrained(base, checkpoint, is_trainable=True)`.

Note: Trainer's label smoother and `compute_loss_func` compute the loss from the logits
and never see `out.loss`; with them, add `outputs["router_loss"]` in your loss function.
"""
from __future__ import annotations

import os

import torch
import transformers

from .model import GMoEModel


class GMoETrainer(transformers.Trainer):
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, GMoEModel):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            model.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
