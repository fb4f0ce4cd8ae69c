"""Fine-tuning a real pretrained causal LM with GMoE (or a baseline adapter) on multiple-choice
commonsense tasks, scored as lm-evaluation-harness does. Entry points: `gmoe-finetune`,
`python -m gmoe.finetune`; see the README section "Fine-tuning on real data"."""
__all__ = ["dataset_root", "load_base_model", "load_tokenizer"]


def __getattr__(name: str):
    """The asset helpers, imported on first use: the command line parses without torch."""
    if name in __all__:
        from . import assets

        return getattr(assets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
