"""lm-eval's model type `gmoe`: HFLM with a GMoE adapter loaded onto the base model.

Registered (lazily) by importing `gmoe.finetune.harness`; this module imports lm-eval and torch
at the top, so it loads only when lm-eval builds a `gmoe` model.

    --model gmoe --model_args pretrained=BASE,adapter=FOLDER[,gmoe_backend=auto|triton|torch]

Every other model argument is HFLM's (dtype, device, batch sizes, trust_remote_code, ...).
"""
from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


@register_model("gmoe")
class GMoELM(HFLM):
    """A Hugging Face causal LM (`pretrained`) with the GMoE adapter saved in `adapter`."""

    def __init__(self, pretrained: str = None, adapter: str = None, gmoe_backend: str | None = None, **kwargs):
        if not isinstance(pretrained, str) or not pretrained:
            raise ValueError("model type gmoe needs pretrained=BASE_MODEL (a folder or hub id); for a model "
                             "already in memory use gmoe.finetune.harness.run_harness")
        if not isinstance(adapter, str) or not adapter:
            raise ValueError("model type gmoe needs adapter=FOLDER (a GMoE adapter written by save_pretrained)")
        for name in ("peft", "delta"):
            if kwargs.get(name):
                raise ValueError(f"model type gmoe takes adapter=, not {name}=")
        self._gmoe_adapter = adapter
        self._gmoe_backend = gmoe_backend
        super().__init__(pretrained=pretrained, **kwargs)
        self.adapter = adapter

    def _create_model(self, pretrained: str, *args, **kwargs) -> None:
        """The base model as HFLM loads it, then the adapter injected (before HFLM moves it to its device)."""
        from gmoe import GMoEModel

        super()._create_model(pretrained, *args, **kwargs)
        self._model = GMoEModel.from_pretrained(self._model, self._gmoe_adapter, backend=self._gmoe_backend)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["gmoe_adapter"] = self._gmoe_adapter
        return info
