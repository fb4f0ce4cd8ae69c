"""Configs and cost model of the expert-mix kernels: tile tables, their pruning, launch
geometry and the choice of token-kernel variant. No kernel is launched here.

Kept apart from the launchers (expert_mix.py), as triton_kernels keeps its `opt_flags`
beside its matmul: every function here is a pure function of shapes, dtypes and an explicit
target, so the compile gate (benchmarks/compile_gate.py) and the tests can ask what a launch
would pick without launching it.

Target: the compute capability configs are pruned for, 90 (Hopper) or 80 (Ampere).
`device_target` gives the current device's; a caller compiling for a GPU it does not have
(the compile gate) passes one explicitly to the launchers.

The tables are fitted to the compile gate's ptxas reports (sm_90 and sm_80: spill-free),
not yet timed on a GPU. Under TRITON_INTERPRET=1 every table holds one small config (the
interpreter cannot time several, and runs ~5 ms per program per inner-loop step).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..backend import interpreting

TARGETS = (90, 80)


def device_target(device: torch.device | str | None = None) -> int:
    """The target of `device`: 90 from compute capability 9 on, else 80; 90 without CUDA
    (a CPU or `meta` tensor: what the interpreter and the compile gate's default capture)."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(device)
        return 90 if major >= 9 else 80
    return 90


# ---- token kernels (gather variant) ----------------------------------------------------

# Register budget of a token program, in fp32 elements live at once: (BLOCK_T, BLOCK_F) tiles
# (about 6 in the forward, 10 in the backward) plus the gathered (BLOCK_T, BLOCK_F, R_PAD)
# tiles (1 forward, 3 backward), doubled from K 8 on (more slots' values live at once).
# Fitted to benchmarks/compile_gate.py's ptxas reports (sm_90, sm_80): spill-free within it.
TILE_BUDGET = {"forward": (6, 1, 4096), "backward": (10, 3, 3500)}

# T_BUCKET (a power of two of the token count) is in every token kernel's key: decoding
# (T of 1 to 64) and training (T in the thousands) tune apart.
TOKEN_KEY = ("F", "K", "R_PAD", "K_PAD", "T_BUCKET")
DOT_KEY = TOKEN_KEY + ("UP_OFFSET",)
EXPERT_KEY = ("F", "K", "R_PAD", "T_BUCKET", "DOT_DTYPE")
GROUPED_KEY = ("F", "K", "R_PAD", "T_BUCKET", "E")


def live_elements(block_t, block_f, r_pad, k_pad, tiles, gathers):
    return block_t * block_f * (tiles + gathers * r_pad) * (2 if k_pad >= 8 else 1)


def token_configs():
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_F": 32}, num_warps=4)]
    # Few configs: autotuning compiles (and times) each one on first use.
    return [triton.Config({"BLOCK_T": bt, "BLOCK_F": bf}, num_warps=4, num_stages=2)
            for bt, bf in ((2, 16), (4, 16), (8, 16), (8, 32), (16, 32), (32, 16), (16, 64))]


def prune_token_configs(configs, direction: str, r_pad: int, k_pad: int, wide: bool):
    """The gather token configs within TILE_BUDGET[direction] (the smallest when none fits);
    `wide`: fp32 data (loads twice as wide: half the budget)."""
    tiles, gathers, budget = TILE_BUDGET[direction]
    limit = budget // 2 if wide else budget
    kept = [c for c in configs if live_elements(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_F"], r_pad,
                                                k_pad, tiles, gathers) <= limit]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_F"])]


# ---- token kernels (one-hot tl.dot variant) ----------------------------------------------

DOT_MAX_COLUMNS = 512  # E·R beyond which the dot kernels' column loop is too long to keep


def dot_configs():
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_F": 32, "BLOCK_C": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_F": bf, "BLOCK_C": bc}, num_warps=8, num_stages=2)
            for bt, bf, bc in ((32, 64, 32), (16, 64, 32), (16, 32, 16))]


def dot_fits(config, num_columns: int, r_pad: int, k_pad: int, direction: str) -> bool:
    """Whether a dot config can run: a column chunk no wider than the E·R columns there are
    (E 8, R 2 has 16) and no narrower than R (a chunk folds onto whole expert blocks); on a
    GPU also within the registers: per-slot accumulators in budget, the small tile from K 8 on,
    16-token tiles in the backward (three per-slot accumulators; 32 spilled at R 8). Fitted
    to the compile gate's ptxas reports."""
    kw = config.kwargs
    if not r_pad <= kw["BLOCK_C"] <= max(16, triton.next_power_of_2(num_columns)):
        return False
    return interpreting() or (kw["BLOCK_T"] * k_pad * r_pad <= 1024
                              and (k_pad < 8) == (kw["BLOCK_F"] == 64)
                              and (direction == "forward" or kw["BLOCK_T"] == 16))


def prune_dot_configs(configs, direction: str, num_columns: int, r_pad: int, k_pad: int):
    kept = [c for c in configs if dot_fits(c, num_columns, r_pad, k_pad, direction)]
    if not kept:  # expand_mode only picks dot where dot_eligible holds
        raise ValueError(f"no dot config fits R_PAD {r_pad}, K_PAD {k_pad}")
    return kept


def dot_eligible(num_experts: int, rank: int, top_k: int) -> bool:
    """dot runs only where some config fits both directions (so never R > 32, nor R 32 from
    K 4 on, nor R 16 at K 8: their accumulators need more registers than a program has)."""
    r_pad, k_pad = r_pad_token(rank), triton.next_power_of_2(top_k)
    return all(any(dot_fits(c, num_experts * rank, r_pad, k_pad, d) for c in dot_configs())
               for d in ("forward", "backward"))


# ---- per-expert weight-gradient kernel ---------------------------------------------------

# (BLOCK_P, BLOCK_F, warps) spill-free per benchmarks/compile_gate.py, per target and dot
# operand width: sm_80's mma.sync keeps more in registers than sm_90's wgmma.
EXPERT_TILES = {(90, "16-bit"): ((32, 64, 4), (32, 128, 8), (64, 64, 8)),
                (90, "fp32"): ((16, 64, 4), (32, 64, 8)),
                (80, "16-bit"): ((16, 32, 4), (32, 32, 4)),
                (80, "fp32"): ((16, 32, 8), (16, 64, 8), (32, 64, 8))}


def expert_configs():
    if interpreting():
        return [triton.Config({"BLOCK_P": 16, "BLOCK_F": 32}, num_warps=4)]
    tiles = sorted({tile for group in EXPERT_TILES.values() for tile in group})
    return [triton.Config({"BLOCK_P": bp, "BLOCK_F": bf}, num_warps=w, num_stages=2)
            for bp, bf, w in tiles]


def prune_expert_configs(configs, target: int, dot_dtype):
    """The tiles for the target and the dot operands' width (the interpreter's one config
    passes)."""
    wide = dot_dtype in (tl.float32, tl.float64)
    tiles = EXPERT_TILES[(target, "fp32" if wide else "16-bit")]
    kept = [c for c in configs if (c.kwargs["BLOCK_P"], c.kwargs["BLOCK_F"], c.num_warps) in tiles]
    return kept or configs[:1]


SUM_BLOCK = 256 if interpreting() else 1024   # elements per program of _sum_chunks_kernel


# ---- grouped token kernels ---------------------------------------------------------------

# (BLOCK_F, warps) at BLOCK_P 32, spill-free at sm_90 and sm_80 per the compile gate (the
# backward holds three more (BLOCK_P, BLOCK_F) products: 64-wide tiles spilled there).
GROUPED_TILES = {"forward": ((32, 4), (64, 8)), "backward": ((32, 4),)}  # 16-bit data only
# BLOCK_P is fixed (not tuned): the tile table is built from it before the launch.
GROUPED_BLOCK_P = 16 if interpreting() else 32


def grouped_configs(direction: str):
    if interpreting():
        return [triton.Config({"BLOCK_F": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_F": bf}, num_warps=w, num_stages=2)
            for bf, w in GROUPED_TILES[direction]]


# ---- launch geometry -----------------------------------------------------------------------

TARGET_PROGRAMS = 4 * 132   # about four programs per SM of an H100/H200
MAX_F_SPLIT = 64


def r_pad(rank: int) -> int:
    """R padded to a power of two, at least 16 (tl.dot's smallest block): the per-expert and
    grouped kernels."""
    return max(16, triton.next_power_of_2(rank))


def r_pad_token(rank: int) -> int:
    """R padded to a power of two for the token kernels, which reduce over R without tl.dot:
    no floor of 16, so the paper's R = 2 does not pay for 16 masked lanes."""
    return max(2, triton.next_power_of_2(rank))


def t_bucket(num_tokens: int) -> int:
    return min(triton.next_power_of_2(max(num_tokens, 1)), 1 << 16)


def f_split(num_tokens: int, size_f: int) -> int:
    """How many programs share one token tile's F range: enough that about TARGET_PROGRAMS
    programs run when T is small (decoding), one when T alone fills the GPU. Depends on the
    shapes only (not on the tuned config), so results are the same run to run."""
    if interpreting():
        return min(2, triton.cdiv(size_f, 32))  # tests walk several F tiles and two splits
    tiles = triton.cdiv(num_tokens, 16)
    return max(1, min(TARGET_PROGRAMS // tiles, triton.cdiv(size_f, 64), MAX_F_SPLIT))


def chunk_size(num_pairs: int, num_experts: int) -> int:
    """Pairs per chunk of the per-expert kernel: about an expert's fair share, so balanced
    routing gives each expert one or two chunks and a hot expert up to ~E of them."""
    if interpreting():
        return 32  # tests see experts of several chunks and chunks of several blocks
    return max(256, triton.cdiv(triton.cdiv(num_pairs, max(num_experts, 1)), 64) * 64)


# ---- cost model: which token-kernel variant runs ------------------------------------------

EXPAND_MODES = ("gather", "dot", "grouped")

# Estimated extra time of each variant per (token, f), as a fraction of the dense FFN floor's
# 6·H FLOPs on an H200 (989 TFLOP/s bf16, 4.8 TB/s HBM, ~10 TB/s L2); benchmarks/NOTES.md
# derives them, and gpu_check.sh times all three so they can be replaced by measurements.
#   dot:     6·K·E·R one-hot tensor-core FLOPs          -> K·E·R / H
#   grouped: K re-reads of G, U + K fp32 atomic adds    -> ~12·K B  -> GROUPED_COST·K / H
#   gather:  3·R B rows per slot from L2 (16-bit)       -> ~6·K·R B -> GATHER_COST·K·R / H
GROUPED_COST = 400.0
GATHER_COST = 100.0
_HALF = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def shared_half(dtypes):
    """The tl 16-bit dtype every operand has, or None (mixed dtypes, or fp32/fp64 data)."""
    dtypes = set(dtypes)
    return _HALF.get(next(iter(dtypes))) if len(dtypes) == 1 else None


def dot_dtype(dtypes, compute: torch.dtype):
    """16-bit tl.dot operands when every operand has that dtype; else IEEE in `compute`."""
    return shared_half(dtypes) or (tl.float64 if compute == torch.float64 else tl.float32)


def expand_mode(num_experts: int, rank: int, dtypes=(torch.bfloat16,), top_k: int = 2,
                hidden: int = 4096) -> str:
    """Which token kernels run: "gather" (per-token B rows, CUDA-core reduction over R, all
    in fp32), "dot" (one-hot tl.dot against all experts' stacked LoRA matrices) or "grouped"
    (pair tiles of one expert, dense tl.dots, fp32 atomics for the slot sums).

    dot and grouped need x and the LoRA weights in one 16-bit dtype (fp32 data would lose
    precision in 16-bit dots, or run IEEE dots that spilled registers at every tile tried);
    dot also needs R a power of two ≥ 2, E·R ≤ 512 and a config that fits its registers
    (`dot_eligible`); grouped is never picked under torch.use_deterministic_algorithms (its
    slot sums are atomics). Among the eligible ones, the least estimated cost above wins.
    GMOE_EXPAND=gather|dot|grouped forces one where it is eligible (else gather); under the
    interpreter a forced dot or grouped also runs on fp32/fp64 data (tests).
    """
    forced = os.environ.get("GMOE_EXPAND")
    if forced and forced not in EXPAND_MODES:
        raise ValueError(f"GMOE_EXPAND={forced!r}; choose one of {EXPAND_MODES}")
    half = shared_half(dtypes) is not None
    dot_ok = (rank >= 2 and rank == triton.next_power_of_2(rank)   # the fold needs R = R_PAD
              and num_experts * rank <= DOT_MAX_COLUMNS and dot_eligible(num_experts, rank, top_k))
    if forced:
        # Forced under the interpreter, fp32/fp64 data run dot and grouped too (IEEE dots), so
        # the tests' fp32 comparisons and fp64 gradchecks cover them; on a GPU those spill.
        wide_ok = half or interpreting()
        eligible = {"gather": True, "dot": dot_ok and wide_ok,
                    "grouped": wide_ok and not deterministic()}
        return forced if eligible[forced] else "gather"
    costs = {"gather": GATHER_COST * top_k * rank / hidden}
    if half and dot_ok:
        costs["dot"] = top_k * num_experts * rank / hidden
    if half and not deterministic():
        costs["grouped"] = GROUPED_COST * top_k / hidden
    return min(costs, key=costs.get)
