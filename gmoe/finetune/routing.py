"""Routing telemetry of a GMoE model on a task's examples (`GMoEModel.measuring_routing`): the
job records it at injection and after training, and `gmoe-finetune routing` reports it for a
saved adapter beside a freshly injected one."""
from __future__ import annotations

import torch

from ..model import GMoEModel
from .encoding import PadCollator, training_features

#: Examples routed for a report: enough tokens (~5k on SmolLM2 prompts) for stable shares at E 8.
REPORT_EXAMPLES = 128


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


def report_routing(model_name: str, task: str, adapter: str | None = None, method: str = "gmoe", seed: int = 0,
                   max_examples: int = REPORT_EXAMPLES, max_length: int = 256, log=print) -> dict:
    """Routing telemetry on a task's held-out examples (the job's default split): of a freshly
    injected adapter (the baseline: `adapter`'s own config, or `method`'s, seeded by `seed`) and,
    when given, of the saved `adapter`."""
    import copy
    import dataclasses

    import transformers

    from .. import GMoEConfig, get_gmoe_model
    from .assets import load_base_model
    from .job import JobConfig, prepare_data
    from .methods import AdapterSpec, gmoe_config, load_adapter

    if adapter is not None:
        config = GMoEConfig.load(adapter)  # a clear error for a folder that is not a GMoE adapter
    else:
        config = gmoe_config(method, AdapterSpec())
    data = prepare_data(JobConfig(model=model_name, task=task, max_length=max_length))
    base, tok = load_base_model(model_name)
    transformers.set_seed(seed)
    fresh = get_gmoe_model(copy.deepcopy(base), dataclasses.replace(config, base_model_name_or_path=None))
    out = {"task": task, "model": model_name, "split": data.split, "adapter": adapter,
           "config": config.to_dict(), "injection": measure_routing(fresh, tok, data.eval, max_length, max_examples)}
    log(f"freshly injected (seed {seed}):\n" + _format(out["injection"]))
    if adapter is not None:
        trained = load_adapter(base, adapter)
        out["trained"] = measure_routing(trained, tok, data.eval, max_length, max_examples)
        log(f"{adapter}:\n" + _format(out["trained"]))
    return out


def _format(result: dict) -> str:
    from ..telemetry import LayerRouting, RoutingStats

    layers = [LayerRouting(**layer) for layer in result["layers"]]
    stats = RoutingStats(num_experts=result["num_experts"], top_k=result["top_k"], tokens=result["tokens"],
                         exact_sets=result["exact_sets"], layers=layers)
    return stats.format()


def main(argv: list[str]) -> int:
    """`gmoe-finetune routing`: the routing report of a saved adapter, or of a method's fresh injection."""
    import argparse
    import sys

    from .methods import METHODS
    from .report import write_json
    from .tasks import TASKS

    p = argparse.ArgumentParser(
        prog="gmoe-finetune routing",
        description="Routing telemetry (per layer: busiest expert's share, load entropy, tokens on the most common "
                    "top-K set, idle experts, λ, σ) on a task's held-out examples, for a saved GMoE adapter and a "
                    "freshly injected one with the same config")
    p.add_argument("--model", default="smollm2-135m", help="local Hugging Face folder, a .gguf file, or smollm2-135m")
    p.add_argument("--task", default="arc-c", choices=list(TASKS))
    p.add_argument("--adapter", help="a saved GMoE adapter folder (<run dir>/adapter)")
    p.add_argument("--method", default="gmoe", choices=[m for m in METHODS if m != "lora"],
                   help="without --adapter: the method whose fresh injection is reported")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh injection")
    p.add_argument("--max-examples", type=int, default=REPORT_EXAMPLES)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    if args.max_examples < 1 or args.max_length < 2:
        p.error("--max-examples must be at least 1 and --max-length at least 2")
    try:
        result = report_routing(args.model, args.task, args.adapter, args.method, args.seed, args.max_examples,
                                args.max_length)
    except (ValueError, FileNotFoundError) as err:
        print(f"gmoe-finetune routing: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        write_json(args.json, result)
        print(f"report: {args.json}")
    return 0
