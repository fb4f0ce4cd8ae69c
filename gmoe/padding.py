"""Which tokens of a forward are padding, for the GMoE layers (DESIGN.md, "Inference").

A decoder MLP sees flattened tokens (T = batch × sequence) and no attention mask. In eval,
GMoEModel reads the mask once per forward, in a forward pre-hook on the base model (so
`model(...)` and `model.generate(...)` both pass through it), and shares the real rows with
every GMoE layer through one `TokenRows`; the layers then route, count and mix only those.
Not in training (the training step keeps its shapes and has no host read) and not while
torch.compile traces (static shapes: every row is routed, as in training).
"""
from __future__ import annotations

import torch


class TokenRows:
    """The real rows (int64 indices into the flattened tokens) of the current forward, or none."""

    def __init__(self):
        self._rows: torch.Tensor | None = None
        self._num_tokens = -1

    def clear(self) -> None:
        self._rows, self._num_tokens = None, -1

    def real(self, num_tokens: int) -> torch.Tensor | None:
        """The real rows if this forward has padding and `num_tokens` tokens, else None."""
        if torch.compiler.is_compiling() or self._rows is None or num_tokens != self._num_tokens:
            return None
        return self._rows

    def note_mask(self, attention_mask, tokens) -> None:
        """Set from a 2-D attention mask (batch, cached + current) and the current tokens
        (input_ids (batch, seq) or inputs_embeds (batch, seq, H)): the current tokens are the
        mask's last `seq` columns (left padding, with or without a KV cache). Any other mask
        (4-D, packed) leaves the forward unmasked. One host read of the mask per forward."""
        self.clear()
        if attention_mask is None or tokens is None or attention_mask.dim() != 2 or tokens.dim() < 2:
            return
        batch, seq = tokens.shape[0], tokens.shape[1]
        if attention_mask.shape[0] != batch or attention_mask.shape[1] < seq:
            return
        keep = attention_mask[:, attention_mask.shape[1] - seq:].reshape(-1) != 0
        if bool(keep.all()):
            return
        self._rows, self._num_tokens = keep.nonzero().squeeze(1).to(tokens.device), batch * seq
