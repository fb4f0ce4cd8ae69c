"""One GMoE training step on the GPU with host synchronisations turned into errors.

    python benchmarks/sync_check.py [--json OUT]

A small Llama built from a config (no hub), GMoE (graph router, E 8, K 2) on the Triton
backend, bf16 autocast, eager attention (transformers' sdpa mask helper reads the padding
mask on the host: not ours). After one warm-up step (autotuning may synchronise), the next
forward + backward runs under `torch.cuda.set_sync_debug_mode("error")` and the CPU-side
recorder of tests/host_sync.py (which also sees inside our custom ops). Exit status 1 when
either reports a synchronisation.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from gmoe import GMoEConfig, get_gmoe_model
from tests.host_sync import check_training_step
from tests.models import tiny_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sync_check: no CUDA device")
        return 2
    torch.manual_seed(0)
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
    ok = not syncs and not error
    result = {"ok": ok, "syncs": syncs, "error": error}
    print(f"sync check: {'no host synchronisation' if ok else 'SYNCHRONISES'}")
    for line in syncs + ([error] if error else []):
        print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
