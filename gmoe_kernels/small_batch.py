"""Which path the expert mix takes for a few tokens: the gathered one (each token's K experts'
LoRA factors gathered, batched matmuls, no routing plan: `reference/expert_mix_gathered.py`)
or the backend's own (the reference's plan path, the Triton kernels).

MAX_TOKENS[backend]: the gathered path runs for T ≤ this many tokens, where no gradient is
recorded (decoding, scoring, generation; a training step keeps the plan path, unchanged).
Measured in the whole model: a greedy decoding step of SmolLM2-135M with GMoE (H 576, F 1536,
E 8, K 2, R 8, fp32, KV cache) at batch T with each path forced in every MLP, all paths
interleaved in one run (`benchmarks/small_batch.py --model smollm2-135m --full`,
benchmarks/results/small-batch-cpu-smollm2-1thread.json):
- reference (CPU): 8. On the 2-core AMD EPYC with 1 thread the step took 89 / 133 / 145 / 160 ms
  at T = 1 / 2 / 4 / 8 on the gathered path against the plan path's 102 / 142 / 153 / 171 ms,
  and lost from T = 16 (201 vs 195 ms; 304 vs 275 at 32): its copies of the chosen experts'
  factors grow with T·K, while the plan path reads each expert once. A third path that reads
  every expert's factors in place (no copies, E/K times the LoRA arithmetic) was measured in
  the same run: it was never faster than the better of these two by more than 0.5 % (at T = 8;
  3–8 % slower elsewhere), so it was not kept.
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
