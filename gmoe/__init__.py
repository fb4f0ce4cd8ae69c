"""gmoe: GMoE (graph-routed mixture of LoRA experts) for Hugging Face causal LMs."""
import importlib

__version__ = "0.1.0"
__all__ = ["convert", "GMoEConfig", "GMoEModel", "get_gmoe_model", "__version__"]

# Imported on first use (PEP 562), so that `gmoe.finetune`'s command line answers --help and usage
# errors without loading torch.
_LAZY = {"GMoEConfig": ".config", "GMoEModel": ".model", "get_gmoe_model": ".model"}


def __getattr__(name: str):
    if name == "convert":
        return importlib.import_module(".convert", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
