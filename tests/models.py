"""Tiny Hugging Face models built from configs (no hub access needed)."""
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}


def tiny_model(family="llama", vocab=64, hidden=32, inter=48, layers=2):
    if not all(hasattr(transformers, n) for n in _CLASSES[family]):
        import pytest
        pytest.skip(f"transformers {transformers.__version__} has no {family} model")
    config_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[family])
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=hidden // 4, max_position_embeddings=128)
    return model_cls(config).eval()
