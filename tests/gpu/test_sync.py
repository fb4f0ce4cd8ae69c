"""One GMoE training step on the GPU with host synchronisations turned into errors (run by
benchmarks/gpu_check.sh).

  TRITON_INTERPRET=0 pytest tests/gpu/test_sync.py -m gpu -q     # on a CUDA machine; skipped elsewhere

A small Llama built from a config (no hub), GMoE (graph router, E 8, K 2) on the Triton
backend, bf16 autocast, eager attention (transformers' sdpa mask helper reads the padding
mask on the host: not ours). After one warm-up step (autotuning may synchronise), the next
forward + backward runs under `torch.cuda.set_sync_debug_mode("error")` and the CPU-side
recorder of tests/host_sync.py (which also sees inside our custom ops). Fails when either
reports a synchronisation. With GMOE_SYNC_REPORT=<file>, the result is written there as JSON.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from gmoe import GMoEConfig, get_gmoe_model
from tests.host_sync import check_training_step
from tests.models import tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_a_training_step_never_synchronises_with_the_host(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: this test is for the real GPU kernels")
    monkeypatch.delenv("GMOE_BACKEND", raising=False)
    base = tiny_model("llama", vocab=4096, hidden=256, inter=704, layers=2).cuda()
    base.set_attn_implementation("eager")
    config = GMoEConfig(num_experts=8, top_k=2, r=8, lora_alpha=16, backend="triton")
    model = get_gmoe_model(base, config).train()
    ids = torch.randint(0, base.config.vocab_size, (2, 128), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :16] = 0

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask,
                        labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()

    error = ""
    try:
        recorder = check_training_step(step, device="cuda")
        syncs = [str(s) for s in recorder.syncs]
    except RuntimeError as exc:   # set_sync_debug_mode("error") raises at the sync
        syncs, error = [], str(exc).splitlines()[0]
    report = os.environ.get("GMOE_SYNC_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"ok": not syncs and not error, "syncs": syncs, "error": error}, f, indent=1)
    assert not syncs and not error, "host synchronisations:\n  " + "\n  ".join(syncs + [error])
