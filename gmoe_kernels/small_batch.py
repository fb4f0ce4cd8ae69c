"""Which path the expert mix takes for a few tokens: the gathered one (each token's K experts'
LoRA factors gathered, batched matmuls, no routing plan: `reference/expert_mix_gathered.py`)
or the backend's own (the reference's plan path, the Triton kernels).

MAX_TOKENS[backend]: the gathered path runs for T ≤ this many tokens, where no gradient is
recorded (decoding, scoring, generation; a training step keeps the plan path, unchanged).
Measured with `benchmarks/small_batch.py` at SmolLM2-135M's MLP sizes (H 576, F 1536, E 8,
K 2, R 8, fp32), both paths interleaved in one run, results in
benchmarks/results/small-batch-cpu-*.json:
- reference (CPU): 8. On the 2-core AMD EPYC (shared with other jobs, load average ~5) with
  1 thread the gathered path took 0.48 / 0.34 / 0.63 / 1.26 ms at T = 1 / 2 / 4 / 8 against the
  plan path's 0.88 / 1.02 / 1.13 / 1.46 ms, and lost from T = 16 (2.8 vs 2.4 ms): its gathered
  copies of the B factors grow with T·K, while the plan path reads each expert once.
- triton: 0 (never) until measured on a GPU. There the Triton forward already needs no routing
  plan in its gather and dot modes (one token kernel, no host sync), against ~20 PyTorch
  kernels for the gathered path; benchmarks/gpu_check.sh measures both.
"""
from __future__ import annotations

import contextlib

MAX_TOKENS = {"reference": 8, "triton": 0}
PATHS = ("plan", "gathered")

_forced: str | None = None


def use_gathered(num_tokens: int, backend: str, recording: bool) -> bool:
    """Whether `functional.expert_mix` takes the gathered path for `num_tokens` tokens on the
    resolved `backend`; `recording`: autograd records the call (then never, unless forced)."""
    if _forced is not None:
        return _forced == "gathered"
    return not recording and num_tokens <= MAX_TOKENS[backend]


@contextlib.contextmanager
def forced_path(path: str | None):
    """Within this context every expert mix takes `path` ("plan": the backend's own,
    "gathered"), whatever the token count and autograd; None restores the rule. For benchmarks
    and tests."""
    global _forced
    if path is not None and path not in PATHS:
        raise ValueError(f"path={path!r} is not an expert-mix path; choose one of {PATHS} or None")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous
