"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness defines it.

For each (context, continuation) request: the sum of the continuation tokens' log-probabilities
given everything before them. `acc`: the choice with the largest sum is right; `acc_norm`: the
largest sum divided by the choice's length in characters. Requests are batched (right-padded,
longest first, so the order is fixed and deterministic), under `torch.no_grad()` in eval mode.
Works with any module that maps (input_ids, attention_mask) to `.logits`: a bare Hugging Face
model, a PEFT model, a GMoEModel.
"""
from __future__ import annotations

import time

import torch

from .encoding import encode_pair, truncate_left


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(order: list[int], lengths: list[int], batch_size: int, max_batch_tokens: int):
    """Consecutive runs of `order` (longest first) of at most `batch_size` requests and at most
    `max_batch_tokens` padded tokens (at least one request each): short requests share a forward."""
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) == batch_size or (len(batch) + 1) * width > max_batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 64,
                   max_length: int = 1024, pad_token_id: int = 0, max_batch_tokens: int = 2048,
                   forwards=None) -> list[float]:
    """Summed log-likelihood of each request's continuation ids given its context ids. A forward
    holds at most `batch_size` requests and `max_batch_tokens` padded tokens (its logits are
    max_batch_tokens × vocabulary floats). `forwards(n)`, when given, is told this call's number of
    forwards and returns how many to run in all: the extra ones run on one pad token and are discarded
    (under FSDP or ZeRO-3 every forward is a collective, so every rank must run as many)."""
    device = _device(model)
    seqs = []
    for ctx, cont in requests:
        ctx, cont = truncate_left(ctx, cont, max_length + 1)  # the last token is never an input
        if not ctx:  # a lone continuation: its first token would have no prediction to score
            raise ValueError(f"a continuation of {len(cont)} tokens leaves no context within max_length="
                             f"{max_length}; raise --max-length")
        seqs.append((ctx + cont)[:-1])
    order = sorted(range(len(requests)), key=lambda i: -len(seqs[i]))
    out = [0.0] * len(requests)
    batches = list(_batches(order, [len(q) for q in seqs], batch_size, max_batch_tokens))
    padding = (forwards(len(batches)) - len(batches)) if forwards is not None else 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(padding):
                one = torch.full((1, 1), pad_token_id, dtype=torch.long, device=device)
                model(input_ids=one, attention_mask=torch.ones_like(one))
            for idx in batches:
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                    mask[row, :len(seqs[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for row, i in enumerate(idx):
                    cont = requests[i][1]
                    end = len(seqs[i])  # logits at end - len(cont) .. end - 1 predict the continuation
                    logp = torch.log_softmax(logits[row, end - len(cont):end].float(), dim=-1)
                    target = torch.tensor(cont, device=logp.device)
                    out[i] = logp.gather(1, target[:, None]).sum().item()
    finally:
        model.train(was_training)
    return out


def pick(scores: list[float]) -> int:
    """The index of the largest score (the first on an exact tie, as numpy.argmax)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def evaluate(model, tokenizer, examples, batch_size: int = 64, max_length: int = 1024,
             max_batch_tokens: int = 2048, ranks=None, equal_forwards: bool = False) -> dict:
    """acc, acc_norm, per-example predictions and throughput over `examples`. With `ranks` (several
    processes), each rank scores a contiguous share of the examples and the per-example log-likelihoods
    are gathered in order, so every rank returns the whole result; `equal_forwards`: every rank runs as
    many forwards (FSDP, ZeRO-3). `seconds` is then the slowest rank's."""
    from . import distributed

    ranks = ranks or distributed.Ranks()
    share = ranks.shard(len(examples))
    forwards = (lambda n: max(distributed.gather(ranks, n))) if equal_forwards and ranks.distributed else None
    part = _score_examples(model, tokenizer, examples[share.start:share.stop], batch_size, max_length,
                           max_batch_tokens, forwards)
    parts = distributed.gather(ranks, part)
    per_ex = [lls for p in parts for lls in p["loglikelihoods"]]
    return _result(examples, per_ex, requests=sum(p["requests"] for p in parts),
                   tokens=sum(p["tokens"] for p in parts), seconds=max(p["seconds"] for p in parts))


def _score_examples(model, tokenizer, examples, batch_size, max_length, max_batch_tokens, forwards) -> dict:
    """Each example's per-choice log-likelihoods, with the request and token counts and the time taken."""
    requests, owner = [], []
    for e, ex in enumerate(examples):
        for ctx, cont in zip(ex.contexts, ex.continuations):
            requests.append(encode_pair(tokenizer, ctx, cont))
            owner.append(e)
    start = time.perf_counter()
    lls = loglikelihoods(model, requests, batch_size=batch_size, max_length=max_length,
                         pad_token_id=tokenizer.pad_token_id, max_batch_tokens=max_batch_tokens, forwards=forwards)
    seconds = time.perf_counter() - start
    tokens = sum(min(len(c) + len(k), max_length + 1) - 1 for c, k in requests)
    per_ex = [[] for _ in examples]
    for e, ll in zip(owner, lls):
        per_ex[e].append(ll)
    return {"loglikelihoods": per_ex, "requests": len(requests), "tokens": tokens, "seconds": seconds}


def _result(examples, per_ex: list[list[float]], requests: int, tokens: int, seconds: float) -> dict:
    pred = [pick(s) for s in per_ex]
    pred_norm = [pick([s / max(n, 1) for s, n in zip(scores, ex.norm_lengths)])
                 for scores, ex in zip(per_ex, examples)]
    n = len(examples)
    return {
        "acc": sum(p == ex.gold for p, ex in zip(pred, examples)) / n,
        "acc_norm": sum(p == ex.gold for p, ex in zip(pred_norm, examples)) / n,
        "n": n, "requests": requests, "tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "predictions": pred, "predictions_norm": pred_norm,
        "loglikelihoods": per_ex,
    }
