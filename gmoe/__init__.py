"""gmoe: GMoE (graph-routed mixture of LoRA experts) for Hugging Face causal LMs."""
from . import convert
from .config import GMoEConfig
from .model import GMoEModel, get_gmoe_model

__version__ = "0.1.0"
__all__ = ["convert", "GMoEConfig", "GMoEModel", "get_gmoe_model", "__version__"]
