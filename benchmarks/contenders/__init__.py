"""Every contender, built from one shared set of weights and inputs per case.

A `Problem` holds the frozen FFN, E stacked LoRA experts, both routers' weights, the input x
and one routing (indices, weights) for a Case. Each contender reads those same tensors (PEFT
and MixLoRA get copies of them in their own modules), so every row of a case computes on
identical shapes, weights and inputs:

  ffn:    gmoe-triton, gmoe-reference, loop, peft-lora (expert 0's LoRA on gate/up/down),
          dense-frozen, mixlora (forward only, its own MixLoraSparseMoe on the same experts;
          its gate is the `linear` router's weight, so it picks the same experts)
  router: graph-triton, graph-reference, graph-pyg (GCNConv over a block-diagonal graph of
          T·(E+1) nodes, the published approach), linear
  step:   see `step_contenders`.
  decode: inference on a real model (`decode`): prefill and greedy decoding with the KV cache.

A contender that cannot run here (no CUDA, module missing, package absent, or it raised) is
returned with `error` set, so the report shows why instead of dropping the row.

Modules: `common` (the contender names, `Contender`, `Problem` and its builder, the agreement
check), `ffn`, `router`, `step` (the contenders of each op). Everything is importable from here.
"""
from .common import (ATTENTION, EXTRA_IMPLS, FFN_IMPLS, LORA_KEYS, MLP, REAL_STEP_IMPLS, ROUTER_IMPLS,
                     STEP_IMPLS, Contender,
                     Problem, check_agreement, collect, make_problem, package_missing, ring_adjacency,
                     triton_missing, unavailable)
from .ffn import GatedFFN, ffn_contenders
from .router import block_diagonal_edges, router_contenders
from . import decode
from .decode import DECODE_IMPLS
from .step import (StepProblem, build_llama, export_mixlora_adapter, make_step_problem, step_contenders,
                   step_floor_flops)

__all__ = [
    "ATTENTION", "DECODE_IMPLS", "decode", "EXTRA_IMPLS", "FFN_IMPLS", "LORA_KEYS", "MLP", "REAL_STEP_IMPLS", "ROUTER_IMPLS", "STEP_IMPLS",
    "Contender", "GatedFFN", "Problem", "StepProblem", "block_diagonal_edges", "build_llama",
    "check_agreement", "collect", "export_mixlora_adapter", "ffn_contenders", "make_problem",
    "make_step_problem", "package_missing", "ring_adjacency", "router_contenders", "step_contenders",
    "step_floor_flops", "triton_missing", "unavailable",
]
