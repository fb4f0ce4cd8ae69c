"""Routing telemetry of a GMoE model on a task's examples (`GMoEModel.measuring_routing`): the
job records it at injection and after training, and `gmoe-finetune routing` reports it for a
saved adapter beside a freshly injected one."""
from __future__ import annotations

from .options import DataOptions, RoutingOptions

#: the task of a report without --task and --adapter (a fresh injection)
DEFAULT_TASK = DataOptions.task
#: examples routed for a report (measure.REPORT_EXAMPLES)
REPORT_EXAMPLES = RoutingOptions.max_examples


def __getattr__(name: str):
    """`measure_routing` from measure.py, imported on first use (torch): `routing --help` answers at once."""
    if name == "measure_routing":
        from .measure import measure_routing

        return measure_routing
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from .measure import measure_routing
    from .methods import AdapterSpec, gmoe_config, load_adapter
    from .multitask import job_name

    if adapter is not None:
        config = GMoEConfig.load(adapter)  # a clear error for a folder that is not a GMoE adapter
    else:
        config = gmoe_config(method, AdapterSpec())
    data = prepare_data(JobConfig(model=model_name, task=task, max_length=max_length, eval_only=True))
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


def routing_parser():
    """The parser of `gmoe-finetune routing` (its usage error names the subcommands that take a flag it lacks)."""
    from .cli import elsewhere
    from .options import ModelOptions, field_types, make_parser

    p = make_parser(
        [ModelOptions, RoutingOptions], "gmoe-finetune routing",
        "Routing telemetry (per layer: busiest expert's share, load entropy, tokens on the most common "
        "top-K set, idle experts, λ, σ) on a task's held-out examples, for a saved GMoE adapter and a "
        "freshly injected one with the same config")
    p.elsewhere = elsewhere(set(field_types([ModelOptions, RoutingOptions])))
    return p


def main(argv: list[str]) -> int:
    """`gmoe-finetune routing`: the routing report of a saved adapter, or of a method's fresh injection.
    With --adapter: the adapter is checked whole before any model loads, its recorded run is printed,
    and its recorded task is the default (a --task or --model that differs from the record is noted)."""
    import sys

    from .methods import METHODS
    from .multitask import task_names

    p = routing_parser()
    prog = p.prog
    model_opts, args = p.parse_args_into_dataclasses(argv, look_for_args_file=False)
    if args.task is not None:
        try:
            task_names(args.task)
        except ValueError as err:
            p.error(f"argument --task: {err}")
    if args.method not in METHODS or args.method == "lora":
        p.error(f"argument --method: invalid choice: {args.method!r} (choose from "
                f"{', '.join(m for m in METHODS if m != 'lora')})")
    if args.max_examples < 1 or args.max_length < 2:
        p.error("--max-examples must be at least 1 and --max-length at least 2")
    from .assets import quiet_optional_dependencies

    quiet_optional_dependencies()
    try:
        task = args.task or DEFAULT_TASK
        if args.adapter is not None:
            task = _adapter_task(args, model_opts.model, task_names)
        result = report_routing(model_opts.model, task, args.adapter, args.method, args.seed, args.max_examples,
                                args.max_length)
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        from .report import write_json

        write_json(args.json, result)
        print(f"report: {args.json}")
    return 0


def _adapter_task(args, model: str, task_names) -> str:
    """The task routed for --adapter (the recorded one unless --task is given), after checking the
    adapter whole and printing its record; a ValueError when no task is known."""
    from .adapters import check_adapter, describe, differences, recorded_task, training_record

    if check_adapter(args.adapter, model) != "GMOE":
        raise ValueError(f"--adapter {args.adapter} is a PEFT LoRA adapter, not a GMoE adapter: it has no router to "
                         "report on; pass a GMoE adapter (a run of any method but lora)")
    record = training_record(args.adapter)
    print(f"adapter {describe(args.adapter, record)}")
    if args.task is None and (record is None or not recorded_task(record)):
        raise ValueError(f"--adapter {args.adapter} has no results.json beside it recording its task: pass --task")
    task = args.task or recorded_task(record)
    print(f"routing the held-out examples of {task}" + ("" if args.task else " (the task recorded at training)"))
    if record is not None:
        for note in differences(record, {"task": task, "model": model, "max_length": args.max_length}, task_names):
            print(note)
    return task
