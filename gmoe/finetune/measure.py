"""Routing telemetry of a GMoE model on a task's examples (`GMoEModel.measuring_routing`), as the job
records it at injection and after training and `gmoe-finetune routing` reports it."""
from __future__ import annotations

import torch

from ..model import GMoEModel
from .encoding import PadCollator, training_features
from .options import RoutingOptions

#: Examples routed for a report: enough tokens (~5k on SmolLM2 prompts) for stable shares at E 8.
REPORT_EXAMPLES = RoutingOptions.max_examples


def measure_routing(model, tokenizer, examples, max_length: int, max_examples: int = REPORT_EXAMPLES,
                    batch_size: int = 16) -> dict | None:
    """`RoutingStats.to_dict()` of `model` over the gold (context, continuation) of the first
    `max_examples` examples, in eval mode without gradients; None for a model without GMoE layers."""
    if not isinstance(model, GMoEModel):
        return None
    feats = training_features(tokenizer, examples[:max_examples], max_length)
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with model.measuring_routing(), torch.no_grad():
            for start in range(0, len(feats), batch_size):
                batch = collate(feats[start:start + batch_size])
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            stats = model.routing_stats()
    finally:
        model.train(was_training)
    result = stats.to_dict()
    result["examples"] = len(feats)
    return result
