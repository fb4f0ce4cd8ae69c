"""Which path the expert mix takes for a few tokens where no gradient is recorded (decoding,
scoring, generation; a training step keeps the backend's plan path, unchanged):
- "gathered" (`reference/expert_mix_gathered.py`): each token's K experts' LoRA factors copied
  out, batched matmuls; reads the fewest bytes at one or two tokens;
- "dense" (`reference/expert_mix_dense.py`): every expert's factors read once in place, every
  expert computed for every token, each slot takes its expert's row; no copies;
- "plan": the backend's own path (the reference's routing plan, the Triton kernels).

LIMITS[backend][path]: the gathered path runs for T ≤ LIMITS[b]["gathered"], then the dense one
for T ≤ LIMITS[b]["dense"], then the plan path. Measured in the whole model, decoding
SmolLM2-135M (H 576, F 1536, E 8, K 2, R 8, fp32) with each path forced, all paths interleaved
in one run (`benchmarks/small_batch.py --model`, results in benchmarks/results/small-batch-*.json):
- reference (CPU): gathered up to 4 tokens, dense up to 32. Bytes decide at these sizes: per
  layer the gathered path reads and copies 2·T·K experts' factors, the dense one reads E
  experts' once, so the gathered path should win while T·K ≤ E/2 and the dense one beyond; the
  whole-model step times (1 thread, 2-core AMD EPYC, runs a few % apart in noise) agree at
  T = 1 and put the crossovers between 2 and 16 tokens and near 32.
- triton: never, until measured on a GPU. There the Triton forward already needs no routing
  plan in its gather and dot modes (one token kernel, no host sync), against ~20 PyTorch
  kernels for these paths; benchmarks/gpu_check.sh measures them.
"""
from __future__ import annotations

import contextlib

LIMITS = {"reference": {"gathered": 4, "dense": 32}, "triton": {"gathered": 0, "dense": 0}}
PATHS = ("plan", "gathered", "dense")

_forced: str | None = None


def path_for(num_tokens: int, backend: str, recording: bool) -> str:
    """The path `functional.expert_mix` takes for `num_tokens` tokens on the resolved `backend`;
    `recording`: autograd records the call (then the plan path, unless forced)."""
    if _forced is not None:
        return _forced
    if recording:
        return "plan"
    limits = LIMITS[backend]
    return next((path for path in ("gathered", "dense") if num_tokens <= limits[path]), "plan")


@contextlib.contextmanager
def forced_path(path: str | None):
    """Within this context every expert mix takes `path` (one of PATHS), whatever the token count
    and autograd; None restores the rule. For benchmarks and tests."""
    global _forced
    if path is not None and path not in PATHS:
        raise ValueError(f"path={path!r} is not an expert-mix path; choose one of {PATHS} or None")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous
