"""Routing telemetry of a GMoE model on a task's examples (`GMoEModel.measuring_routing`): the
job records it at injection and after training, and `gmoe-finetune routing` reports it for a
saved adapter beside a freshly injected one."""
from __future__ import annotations

from .measure import REPORT_EXAMPLES, measure_routing
from .options import DataOptions, RoutingOptions


def report_routing(model_name: str, task: str, adapter: str | None = None, method: str = "gmoe", seed: int = 0,
                   max_examples: int = REPORT_EXAMPLES, max_length: int = DataOptions.max_length, log=print) -> dict:
    """Routing telemetry on a task's held-out examples (the job's default split; several tasks: their
    held-out examples interleaved, so every task is among the first `max_examples`): of a freshly
    injected adapter (the baseline: `adapter`'s own config, or `method`'s, seeded by `seed`) and,
    when given, of the saved `adapter`."""
    import copy
    import dataclasses

    import transformers

    from .. import GMoEConfig, get_gmoe_model
    from .assets import load_base_model
    from .job import JobConfig, prepare_data
    from .methods import AdapterSpec, gmoe_config, load_adapter
    from .multitask import job_name

    if adapter is not None:
        config = GMoEConfig.load(adapter)  # a clear error for a folder that is not a GMoE adapter
    else:
        config = gmoe_config(method, AdapterSpec())
    data = prepare_data(JobConfig(model=model_name, task=task, max_length=max_length))
    base, tok = load_base_model(model_name)
    transformers.set_seed(seed)
    fresh = get_gmoe_model(copy.deepcopy(base), dataclasses.replace(config, base_model_name_or_path=None))
    out = {"task": job_name(task), "model": model_name, "split": data.split, "adapter": adapter,
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
    import sys

    from .methods import METHODS, PEFT_METHODS
    from .options import ModelOptions, make_parser
    from .report import write_json
    from .multitask import task_names

    p = make_parser(
        [ModelOptions, RoutingOptions], "gmoe-finetune routing",
        "Routing telemetry (per layer: busiest expert's share, load entropy, tokens on the most common "
                    "top-K set, idle experts, λ, σ) on a task's held-out examples, for a saved GMoE adapter and a "
                    "freshly injected one with the same config")
    model_opts, args = p.parse_args_into_dataclasses(argv, look_for_args_file=False)
    try:
        task_names(args.task)
    except ValueError as err:
        p.error(f"argument --task: {err}")
    if args.method not in METHODS or args.method in PEFT_METHODS:
        p.error(f"argument --method: invalid choice: {args.method!r} (choose from "
                f"{', '.join(m for m in METHODS if m not in PEFT_METHODS)})")
    if args.max_examples < 1 or args.max_length < 2:
        p.error("--max-examples must be at least 1 and --max-length at least 2")
    try:
        result = report_routing(model_opts.model, args.task, args.adapter, args.method, args.seed, args.max_examples,
                                args.max_length)
    except (ValueError, FileNotFoundError) as err:
        print(f"gmoe-finetune routing: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        write_json(args.json, result)
        print(f"report: {args.json}")
    return 0
