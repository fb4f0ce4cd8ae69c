"""Evaluate a GMoE model with lm-evaluation-harness itself (pinned: lm-eval 0.4.13, the `harness` extra).

Two ways in:

- in memory: `run_harness(model, tokenizer, tasks)` wraps a loaded model (a GMoEModel, or any
  Hugging Face causal LM) in lm-eval's `HFLM` and runs `simple_evaluate`; it returns lm-eval's
  per-task results ({"arc_challenge": {"acc,none": ..., "acc_norm,none": ..., ...}}).
- the lm-eval command line: importing this module registers a model type `gmoe` (a subclass of
  HFLM that loads the base model, then the adapter with `GMoEModel.from_pretrained`). lm-eval
  discovers no plugins by itself, so run its CLI through this module:

      python -m gmoe.finetune.harness --model gmoe \\
          --model_args pretrained=BASE_MODEL,adapter=ADAPTER_FOLDER --tasks arc_challenge

  Every other argument is lm-eval's own (`--include_path` for local task YAMLs, `--limit`,
  `--batch_size`, `--output_path`, `--log_samples`, ...). See docs/harness.md.

lm-eval's `peft=` argument cannot load a GMoE adapter (PEFT's registry only takes its own types).
"""
from __future__ import annotations

import sys

MODEL_TYPE = "gmoe"
_BACKEND = "gmoe.finetune.harness_model:GMoELM"
INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'gmoe-kernels[harness]' (lm-eval==0.4.13)"


def register() -> bool:
    """Register the `gmoe` model type with lm-eval (lazily: the class loads on first use).
    Returns False when lm-eval is not installed. Safe to call more than once."""
    try:
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    if MODEL_TYPE not in model_registry:
        model_registry.register(MODEL_TYPE, target=_BACKEND)
    return True


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: list[str], task_dirs=None):
    """lm-eval's TaskManager for `tasks`: only the local task folders (`task_dirs`, one or a list) when
    they define every task asked for (indexing lm-eval's thousands of built-in tasks takes tens of
    seconds); else the built-in tasks as well."""
    _, _, TaskManager = _import_lm_eval()
    dirs = [task_dirs] if isinstance(task_dirs, str) else list(task_dirs or [])
    if not dirs:
        return TaskManager()
    local = TaskManager(include_path=dirs, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    return TaskManager(include_path=dirs)


def harness_output(model, tokenizer, tasks: list[str], *, batch_size: int = 8, limit: int | None = None,
                   task_dir: str | None = None, log_samples: bool = False, manager=None) -> dict:
    """lm-eval's whole `simple_evaluate` output ("results", "configs", and with `log_samples`
    every request's "samples") for an in-memory model; `run_harness` returns its "results".
    `manager`: a TaskManager built already (`task_manager`), else one for `task_dir`."""
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    lm_eval, HFLM, _ = _import_lm_eval()
    register()
    # A GMoEModel is an nn.Module, not a PreTrainedModel: HFLM takes it as is and reads .config,
    # .device and tie_weights() through its attribute forwarding to the wrapped model; the
    # forward is GMoEModel's (adapters on; no router loss in eval mode).
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=log_samples,
                                      task_manager=manager or task_manager(list(tasks), task_dir))
    finally:
        model.train(was_training)  # HFLM puts the model in eval mode
    if out is None:  # simple_evaluate returns None on ranks other than 0
        raise RuntimeError("lm-eval returned no results (not the main process?)")
    return out


def run_harness(model, tokenizer, tasks: list[str], *, batch_size: int = 8, limit: int | None = None,
                task_dir: str | None = None, manager=None) -> dict:
    """Run lm-evaluation-harness on `tasks` with an in-memory model (a GMoEModel or a Hugging Face
    causal LM) and its tokenizer. `limit`: at most that many documents per task; `task_dir`: a
    folder of task YAMLs (lm-eval's include_path) for local tasks. Returns lm-eval's per-task
    results, e.g. {"arc_challenge": {"acc,none": 0.25, "acc_stderr,none": ..., "acc_norm,none": ...}}."""
    return harness_output(model, tokenizer, tasks, batch_size=batch_size, limit=limit, task_dir=task_dir,
                          manager=manager)["results"]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `gmoe` model type registered."""
    if not register():
        raise SystemExit(INSTALL_HINT)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


register()

if __name__ == "__main__":
    main()
