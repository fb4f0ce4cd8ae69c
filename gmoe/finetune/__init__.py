"""Fine-tuning a real pretrained causal LM with GMoE (or a baseline adapter) on multiple-choice
commonsense tasks, scored as lm-evaluation-harness does. Entry points: `gmoe-finetune`,
`python -m gmoe.finetune`; see the README section "Fine-tuning on real data"."""
from .assets import dataset_root, load_base_model, load_tokenizer

__all__ = ["dataset_root", "load_base_model", "load_tokenizer"]
