"""Tokenisation shared by training and scoring, done as lm-evaluation-harness does it.

A (context, continuation) pair: trailing whitespace of the context moves to the start of the
continuation; the pair is encoded as one string and the continuation's tokens are those after the
context's own tokens (so a merge across the boundary goes to the continuation). No special tokens
are added; an empty context gets one prefix token (BOS, else EOS) so the first continuation token
has something to be predicted from. Too long a pair loses tokens from the left.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context token ids, continuation token ids)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start an empty context")
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"the continuation {continuation!r} encodes to no tokens after its context")
    return whole[:len(whole) - len(cont)], cont


def truncate_left(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the last `max_length` tokens of ctx + cont (the continuation wins)."""
    if len(cont) >= max_length:
        return [], cont[-max_length:]
    keep = max_length - len(cont)
    return ctx[-keep:] if keep < len(ctx) else ctx, cont


def training_features(tokenizer, examples, max_length: int) -> list[dict]:
    """One sequence per example: its gold context + gold continuation; labels are the input ids
    on the continuation's tokens and -100 on the prompt."""
    feats = []
    for ex in examples:
        ctx, cont = encode_pair(tokenizer, ex.contexts[ex.gold], ex.continuations[ex.gold])
        ctx, cont = truncate_left(ctx, cont, max_length)
        feats.append({"input_ids": ctx + cont, "labels": [IGNORE_INDEX] * len(ctx) + cont})
    return feats


class PadCollator:
    """Right-pads input_ids (pad id), labels (-100) and builds the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
