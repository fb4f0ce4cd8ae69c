"""A saved adapter folder, checked whole before any model loads or any scoring runs, and the record of
the run that trained it.

`check_adapter` reads, in the order a user fixes them: the config (`peft_type` names a GMoE or a PEFT
LoRA adapter, and the fields validate), the sha256 of the files when the run folder's results.json
recorded one (a file changed after the run), every tensor of the weights file (a truncated file), and
each tensor's name and shape against the base model's, built on the meta device from its config alone
(an edited `num_experts` or `r`, or an adapter of another base). `training_record` is that results.json
(task, method, budget, config), which `eval` and `routing` print and take their default task from.
"""
from __future__ import annotations

import json
import os

from .methods import read_adapter_config

#: peft_type of the adapters a job writes and loads
KINDS = {"GMOE": "GMoE adapter", "LORA": "PEFT LoRA adapter"}
#: fields of a run's recorded config that change what `eval` scores: a note names each one that differs
SCORED_FIELDS = ("model", "task", "dataset", "dataset_config", "eval_split", "train_file", "eval_file", "split_seed",
                 "eval_fraction", "eval_size", "max_eval_examples", "max_length", "dtype")


def adapter_kind(path: str) -> str:
    """"GMOE" or "LORA", from adapter_config.json's peft_type; a ValueError naming the file otherwise."""
    data = read_adapter_config(path)
    where = os.path.join(path, "adapter_config.json")
    if "peft_type" not in data:
        raise ValueError(f"{where} has no peft_type, so it is not the config of an adapter folder written by "
                         "save_pretrained (a GMoE adapter has \"peft_type\": \"GMOE\", a PEFT LoRA adapter "
                         "\"LORA\"); pass <run dir>/adapter of a training run")
    if data["peft_type"] not in KINDS:
        raise ValueError(f"{where} has peft_type {data['peft_type']!r}: only GMoE (\"GMOE\") and PEFT LoRA "
                         "(\"LORA\") adapters load here (published GMoE and MixLoRA adapters: gmoe.convert)")
    return data["peft_type"]


def training_record(path: str) -> dict | None:
    """The results.json of the run whose adapter folder is `path` (`<run dir>/adapter`), or None when
    there is none (an adapter copied elsewhere) or it is unreadable."""
    record = os.path.join(os.path.dirname(os.path.abspath(path)), "results.json")
    try:
        with open(record, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "adapter_sha256" not in data and "adapter_config" not in data:
        return None
    data["path"] = record
    return data


def recorded_task(record: dict) -> str | None:
    """The --task value the run trained on (its config's, or its result's task name)."""
    return (record.get("config") or {}).get("task") or record.get("task")


def describe(path: str, record: dict | None) -> str:
    """One line: the adapter's kind and config, and the run that trained it when one is recorded."""
    try:
        data = read_adapter_config(path)
    except (ValueError, FileNotFoundError):
        data = {}
    if data.get("peft_type") == "GMOE":
        shape = (f"GMoE adapter: E {data.get('num_experts')}, K {data.get('top_k')}, r {data.get('r')}, "
                 f"alpha {data.get('lora_alpha')}, {data.get('router')} router")
    elif data.get("peft_type") == "LORA":
        shape = f"PEFT LoRA adapter: r {data.get('r')}, alpha {data.get('lora_alpha')}"
    else:
        shape = "adapter"
    if record is None:
        return f"{path}: {shape}; no results.json beside it, so its task is not recorded"
    budget = record.get("budget") or {}
    steps = f"--max-steps {budget['max_steps']}" if budget.get("max_steps", -1) > 0 else \
        f"{budget.get('epochs')} epoch(s)"
    return (f"{path}: {shape}; method {record.get('method')}, seed {record.get('seed')}, trained on task "
            f"{recorded_task(record)} with --model {budget.get('model', record.get('model'))} ({steps}, lr "
            f"{budget.get('lr')}; {record['path']})")


def differences(record: dict, values: dict, task_names) -> list[str]:
    """A note for each scored field whose value here differs from the one recorded at training."""
    recorded = dict(record.get("config") or {})
    recorded.setdefault("model", (record.get("budget") or {}).get("model"))
    notes = []
    for name in SCORED_FIELDS:
        if name not in recorded or name not in values:
            continue
        mine, theirs = values[name], recorded[name]
        if name == "task":
            try:
                same = task_names(mine) == task_names(theirs)
            except ValueError:
                same = False
        else:
            same = mine == theirs
        if not same:
            notes.append(f"note: --{name.replace('_', '-')} {mine} differs from the {theirs} recorded at training "
                         f"({record['path']})")
    return notes


def check_adapter(path: str, model: str | None = None) -> str:
    """The adapter's kind after checking it whole (see the module docstring); `model`: the base model
    name or folder its tensors must fit (skipped when None or when its config cannot be read here:
    loading the model then reports why). Raises ValueError / FileNotFoundError naming the file."""
    kind = adapter_kind(path)
    if kind == "GMOE":
        from ..config import GMoEConfig

        config = GMoEConfig.load(path)
    else:
        config = _lora_config(path)
    record = training_record(path)
    if record is not None and isinstance(record.get("adapter_sha256"), dict):
        _check_digest(path, record)
    state = _read_weights(path)
    if model is not None:
        expected = _expected_shapes(kind, config, model, path)
        if expected is not None:
            _check_shapes(expected, state, path)
    return kind


def _lora_config(path: str):
    import peft

    try:
        return peft.LoraConfig.from_pretrained(path)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{os.path.join(path, 'adapter_config.json')} is not a valid PEFT LoRA config "
                         f"({type(err).__name__}: {err})") from err


def _check_digest(path: str, record: dict) -> None:
    from .runfiles import adapter_digest

    found, recorded = adapter_digest(path), record["adapter_sha256"]
    bad = sorted(n for n in set(found) | set(recorded) if found.get(n) != recorded.get(n))
    if bad:
        raise ValueError(f"--adapter {path}: {', '.join(bad)} differ from the sha256 that {record['path']} "
                         "recorded when the run finished (changed or replaced since), so that record no longer "
                         "describes this adapter; rerun the training, or copy the adapter files out of the run "
                         "folder to use them without its record")


def _read_weights(path: str) -> dict:
    from ..io import read_safetensors

    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--adapter {path} has no adapter_model.safetensors: the adapter folder is "
                                "incomplete; pass a folder written by a training run (<run dir>/adapter)")
    return read_safetensors(weights)


def _expected_shapes(kind: str, config, model: str, path: str) -> dict | None:
    """{tensor name: meta tensor} the adapter must hold on `model`, from the model's config on the meta
    device (no weights read); None when the model's config cannot be read here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .assets import MissingAssetError, resolve_model

    try:
        folder, gguf = resolve_model(model)
        model_config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, ImportError, MissingAssetError):
        return None
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model_config)
    if kind == "GMOE":
        from ..io import check_not_merged

        check_not_merged(base, path)  # --model: a merged model saved with its mark
        from ..model import GMoEModel

        return GMoEModel(base, config, _build_graph=False).adapter_state_dict()
    import peft

    return peft.get_peft_model_state_dict(peft.get_peft_model(base, config))


def _check_shapes(expected: dict, state: dict, path: str) -> None:
    from ..io import check_adapter_state

    source = os.path.join(path, "adapter_model.safetensors")
    try:
        check_adapter_state(expected, state, source)
    except ValueError as err:
        raise ValueError(f"--adapter {path} does not fit this base model and its adapter_config.json: {err}") \
            from err
