"""Triton backend of the fused expert mix: launchers, autograd, torch.library registration.

Shapes use DESIGN.md's letters (T tokens, H hidden, F intermediate, E experts, K top-k,
R LoRA rank); `expert_mix` has exactly the signature and results of
gmoe_kernels.reference.expert_ffn.expert_mix.

Three variants of the token kernels (steps 2 and 3), chosen per call by `expand_mode`:
"gather" (_expert_ffn_kernels: each token's B^{e_k} rows gathered, reduced over R on CUDA
cores), "dot" (_expert_ffn_dot_kernels: one-hot tl.dot against all experts' stacked matrices)
and "grouped" (_expert_ffn_grouped_kernels: pair tiles of one expert, dense tl.dot, fp32
atomics for the sums over slots). Same arguments, same results; the tests run all three.

Pipeline (forward):
  1. shrink = s · x [A_g; A_u]^T: one torch GEMM, (T, 2·E·R) in fp32 (fp64 for fp64 x).
  2. The token kernel over (token tile, F split): for each slot k recomputes
     g_k = G + B_g^{e_k} shrink_g, u_k likewise, h_k = act(g_k) u_k in fp32, sums
     h_c = sum_k w_k h_k in registers and writes it once per F tile; a_d = A_d^{e_k} h_k, a
     reduction over F, stays per slot in registers over the split and is written once to a
     (SPLIT, T, K, R) partial buffer; the launcher sums the splits and scatters the slots
     into z's expert blocks (`_slots_to_experts`). No [T·K, F] tensor ever exists.
Backward:
  3. The token kernel again: recomputes g_k, u_k, h_k, writes dG, dU once per F tile, and
     dw and d(shrink) per slot to partial buffers, as a_d in the forward.
  4. `_expert_mix_bwd_expert_kernel` over (chunk of one expert's pairs, F tile): dB_g, dB_u,
     dA_d of the chunk with tl.dot; `_sum_chunks_kernel` adds the chunks per expert in order.
  5. dx = s·d(shrink) [A_g; A_u] and dA = s·d(shrink)^T x: small torch GEMMs.
gather and dot use no atomics and sum in a fixed order for a given config; under
torch.use_deterministic_algorithms the config is fixed too (`_launch`) and grouped, whose
slot sums are atomics, is never picked: the results are then bitwise reproducible. Saved for
backward: x, G, U, the LoRA weights, indices, weights; the shrink GEMM and the routing plan
are recomputed in backward (both small).

Block sizes: R is padded inside the kernels with masks, to R_PAD = max(2, next_pow2(R)) in
the gather and dot kernels and max(16, next_pow2(R)) where tl.dot multiplies by R (the
per-expert and grouped kernels). K and R are constexprs. Under TRITON_INTERPRET=1 one fixed
config runs per kernel; on a GPU `triton.autotune` picks among configs keyed on the shapes
and a token-count bucket, pruned to the spill-free budgets below (fitted to
benchmarks/compile_gate.py's ptxas reports, not yet timed on a GPU).
"""
import os

import torch
import triton
import triton.language as tl

from ..activations import canonical_activation, compute_dtype
from ..backend import interpreting
from ..checks import check_expert_mix
from . import _expert_ffn_dot_kernels as dot_kernels
from . import _expert_ffn_grouped_kernels as grouped_kernels
from . import _expert_ffn_kernels as kernels
from .routing import make_routing_plan, new_output

# Register budget of a token program, in fp32 elements live at once: (BLOCK_T, BLOCK_F) tiles
# (about 6 in the forward, 10 in the backward) plus the gathered (BLOCK_T, BLOCK_F, R_PAD)
# tiles (1 forward, 3 backward), doubled from K 8 on (more slots' values live at once).
# Fitted to benchmarks/compile_gate.py's ptxas reports (sm_90, sm_80): spill-free within it.
_TILE_BUDGET = {"forward": (6, 1, 4096), "backward": (10, 3, 3500)}
_TARGET_PROGRAMS = 4 * 132   # about four programs per SM of an H100/H200
_MAX_F_SPLIT = 64


def _live_elements(block_t, block_f, r_pad, k_pad, tiles, gathers):
    return block_t * block_f * (tiles + gathers * r_pad) * (2 if k_pad >= 8 else 1)


def _token_configs():
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_F": 32}, num_warps=4)]
    # Few configs: autotuning compiles each one, and a GPU check has minutes, not hours.
    return [triton.Config({"BLOCK_T": bt, "BLOCK_F": bf}, num_warps=4, num_stages=2)
            for bt, bf in ((2, 16), (4, 16), (8, 16), (8, 32), (16, 32), (32, 16), (16, 64))]


def _gather_prune(direction):
    """Keep the configs within _TILE_BUDGET[direction] (the smallest when none fits)."""
    tiles, gathers, budget = _TILE_BUDGET[direction]

    def prune(configs, named_args, **kwargs):
        wide = named_args["gate_base_ptr"].dtype == torch.float32   # fp32 loads: half the budget
        limit = budget // 2 if wide else budget
        kept = [c for c in configs if _live_elements(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_F"],
                                                     kwargs["R_PAD"], kwargs["K_PAD"], tiles,
                                                     gathers) <= limit]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_F"])]
    return prune


# T_BUCKET (a power of two of the token count) is in every token kernel's key: decoding
# (T of 1 to 64) and training (T in the thousands) tune apart.
_TOKEN_KEY = ["F", "K", "R_PAD", "K_PAD", "T_BUCKET"]

_fwd_kernel = triton.autotune(
    configs=_token_configs(), key=_TOKEN_KEY,
    prune_configs_by={"early_config_prune": _gather_prune("forward")},
)(kernels._expert_mix_fwd_kernel)

_bwd_token_kernel = triton.autotune(
    configs=_token_configs(), key=_TOKEN_KEY,
    prune_configs_by={"early_config_prune": _gather_prune("backward")},
)(kernels._expert_mix_bwd_token_kernel)


def _dot_configs():
    if interpreting():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_F": 32, "BLOCK_C": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_F": bf, "BLOCK_C": bc}, num_warps=8, num_stages=2)
            for bt, bf, bc in ((32, 64, 32), (16, 64, 32), (16, 32, 16))]


def _dot_fits(config, num_columns, r_pad, k_pad, direction) -> bool:
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


def _dot_prune(direction):
    def prune(configs, named_args, **kwargs):
        kept = [c for c in configs if _dot_fits(c, named_args["UP_OFFSET"], kwargs["R_PAD"],
                                                 kwargs["K_PAD"], direction)]
        if not kept:  # expand_mode only picks dot where _dot_eligible holds
            raise ValueError(f"no dot config fits R_PAD {kwargs['R_PAD']}, K_PAD {kwargs['K_PAD']}")
        return kept
    return prune


def _dot_eligible(num_experts: int, rank: int, top_k: int) -> bool:
    """dot runs only where some config fits both directions (so never R > 32, nor R 32 from
    K 4 on, nor R 16 at K 8: their accumulators need more registers than a program has)."""
    r_pad, k_pad = _r_pad_token(rank), triton.next_power_of_2(top_k)
    return all(any(_dot_fits(c, num_experts * rank, r_pad, k_pad, d) for c in _dot_configs())
               for d in ("forward", "backward"))


_fwd_dot_kernel = triton.autotune(
    configs=_dot_configs(), key=_TOKEN_KEY + ["UP_OFFSET"],
    prune_configs_by={"early_config_prune": _dot_prune("forward")},
)(dot_kernels._expert_mix_fwd_dot_kernel)

_bwd_token_dot_kernel = triton.autotune(
    configs=_dot_configs(), key=_TOKEN_KEY + ["UP_OFFSET"],
    prune_configs_by={"early_config_prune": _dot_prune("backward")},
)(dot_kernels._expert_mix_bwd_token_dot_kernel)


# (BLOCK_P, BLOCK_F, warps) spill-free per benchmarks/compile_gate.py, per target and dot
# operand width: sm_80's mma.sync keeps more in registers than sm_90's wgmma.
_EXPERT_TILES = {(90, "16-bit"): ((32, 64, 4), (32, 128, 8), (64, 64, 8)),
                 (90, "fp32"): ((16, 64, 4), (32, 64, 8)),
                 (80, "16-bit"): ((16, 32, 4), (32, 32, 4)),
                 (80, "fp32"): ((16, 32, 8), (16, 64, 8), (32, 64, 8))}

# The compute capability the config pruning is for: the current GPU's, or what
# benchmarks/compile_gate.py sets here to compile for a GPU this machine does not have.
TARGET_CAPABILITY: int | None = None


def _capability() -> int:
    if TARGET_CAPABILITY is not None:
        return TARGET_CAPABILITY
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return 90 if major >= 9 else 80
    return 90


def _expert_configs():
    if interpreting():
        return [triton.Config({"BLOCK_P": 16, "BLOCK_F": 32}, num_warps=4)]
    tiles = sorted({tile for group in _EXPERT_TILES.values() for tile in group})
    return [triton.Config({"BLOCK_P": bp, "BLOCK_F": bf}, num_warps=w, num_stages=2)
            for bp, bf, w in tiles]


def _prune_expert_configs(configs, named_args, **kwargs):
    """The tiles for the target and the dot operands' width (the interpreter's one config
    passes)."""
    wide = kwargs["DOT_DTYPE"] in (tl.float32, tl.float64)
    tiles = _EXPERT_TILES[(_capability(), "fp32" if wide else "16-bit")]
    kept = [c for c in configs if (c.kwargs["BLOCK_P"], c.kwargs["BLOCK_F"], c.num_warps) in tiles]
    return kept or configs[:1]


_bwd_expert_kernel = triton.autotune(
    configs=_expert_configs(), key=["F", "K", "R_PAD", "T_BUCKET", "DOT_DTYPE"],
    prune_configs_by={"early_config_prune": _prune_expert_configs},
)(kernels._expert_mix_bwd_expert_kernel)


def _grouped_configs(tiles):
    if interpreting():
        return [triton.Config({"BLOCK_F": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_F": bf}, num_warps=w, num_stages=2) for bf, w in tiles]


# (BLOCK_F, warps) at BLOCK_P 32, spill-free at sm_90 and sm_80 per the compile gate (the
# backward holds three more (BLOCK_P, BLOCK_F) products: 64-wide tiles spilled there).
_GROUPED_TILES = {"forward": ((32, 4), (64, 8)), "backward": ((32, 4),)}  # 16-bit data only


_SUM_BLOCK = 256 if interpreting() else 1024   # elements per program of _sum_chunks_kernel

# BLOCK_P is fixed (not tuned): the tile table is built from it before the launch.
_GROUPED_BLOCK_P = 16 if interpreting() else 32
_GROUPED_KEY = ["F", "K", "R_PAD", "T_BUCKET", "E"]
_fwd_grouped_kernel = triton.autotune(
    configs=_grouped_configs(_GROUPED_TILES["forward"]), key=_GROUPED_KEY,
    reset_to_zero=["h_c_ptr"],
)(grouped_kernels._expert_mix_fwd_grouped_kernel)
_bwd_grouped_kernel = triton.autotune(
    configs=_grouped_configs(_GROUPED_TILES["backward"]), key=_GROUPED_KEY,
    reset_to_zero=["d_gate_base_ptr", "d_up_base_ptr"],
)(grouped_kernels._expert_mix_bwd_grouped_kernel)

EXPAND_MODES = ("gather", "dot", "grouped")
_DOT_MAX_COLUMNS = 512  # E·R beyond which the dot kernels' column loop is too long to keep

# Estimated extra time of each variant per (token, f), as a fraction of the dense FFN floor's
# 6·H FLOPs on an H200 (989 TFLOP/s bf16, 4.8 TB/s HBM, ~10 TB/s L2); benchmarks/NOTES.md
# derives them, and gpu_check.sh times all three so they can be replaced by measurements.
#   dot:     6·K·E·R one-hot tensor-core FLOPs          -> K·E·R / H
#   grouped: K re-reads of G, U + K fp32 atomic adds    -> ~12·K B  -> _GROUPED_COST·K / H
#   gather:  3·R B rows per slot from L2 (16-bit)       -> ~6·K·R B -> _GATHER_COST·K·R / H
_GROUPED_COST = 400.0
_GATHER_COST = 100.0
_HALF = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def expand_mode(num_experts: int, rank: int, dtypes=(torch.bfloat16,), top_k: int = 2,
                hidden: int = 4096) -> str:
    """Which token kernels run: "gather" (per-token B rows, CUDA-core reduction over R, all
    in fp32), "dot" (one-hot tl.dot against all experts' stacked LoRA matrices) or "grouped"
    (pair tiles of one expert, dense tl.dots, fp32 atomics for the slot sums).

    dot and grouped need x and the LoRA weights in one 16-bit dtype (fp32 data would lose
    precision in 16-bit dots, or run IEEE dots that spilled registers at every tile tried);
    dot also needs R a power of two ≥ 2, E·R ≤ 512 and a config that fits its registers
    (`_dot_eligible`); grouped is never picked under torch.use_deterministic_algorithms (its
    slot sums are atomics). Among the eligible ones, the least estimated cost above wins.
    GMOE_EXPAND=gather|dot|grouped forces one where it is eligible (else gather); under the
    interpreter a forced dot or grouped also runs on fp32/fp64 data (tests).
    """
    forced = os.environ.get("GMOE_EXPAND")
    if forced and forced not in EXPAND_MODES:
        raise ValueError(f"GMOE_EXPAND={forced!r}; choose one of {EXPAND_MODES}")
    half = _shared_half(dtypes) is not None
    dot_ok = (rank >= 2 and rank == triton.next_power_of_2(rank)   # the fold needs R = R_PAD
              and num_experts * rank <= _DOT_MAX_COLUMNS and _dot_eligible(num_experts, rank, top_k))
    if forced:
        # Forced under the interpreter, fp32/fp64 data run dot and grouped too (IEEE dots), so
        # the tests' fp32 comparisons and fp64 gradchecks cover them; on a GPU those spill.
        wide_ok = half or interpreting()
        eligible = {"gather": True, "dot": dot_ok and wide_ok,
                    "grouped": wide_ok and not _deterministic()}
        return forced if eligible[forced] else "gather"
    costs = {"gather": _GATHER_COST * top_k * rank / hidden}
    if half and dot_ok:
        costs["dot"] = top_k * num_experts * rank / hidden
    if half and not _deterministic():
        costs["grouped"] = _GROUPED_COST * top_k / hidden
    return min(costs, key=costs.get)


def _shared_half(dtypes):
    """The tl 16-bit dtype every operand has, or None (mixed dtypes, or fp32/fp64 data)."""
    dtypes = set(dtypes)
    return _HALF.get(next(iter(dtypes))) if len(dtypes) == 1 else None


def _dot_dtype(dtypes, acc):
    """16-bit tl.dot operands when every operand has that dtype; else IEEE in `acc`."""
    return _shared_half(dtypes) or (tl.float64 if acc == torch.float64 else tl.float32)


def _token_kernel_launch(kernel_gather, kernel_dot, mode, dtypes, acc):
    """(kernel, extra constexprs) for the chosen token-kernel variant."""
    if mode == "gather":
        return kernel_gather, {}
    return kernel_dot, {"DOT_DTYPE": _dot_dtype(dtypes, acc)}


def _r_pad(rank: int) -> int:
    """R padded to a power of two, at least 16 (tl.dot's smallest block): the per-expert and
    grouped kernels."""
    return max(16, triton.next_power_of_2(rank))


def _r_pad_token(rank: int) -> int:
    """R padded to a power of two for the token kernels, which reduce over R without tl.dot:
    no floor of 16, so the paper's R = 2 does not pay for 16 masked lanes."""
    return max(2, triton.next_power_of_2(rank))


def _launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs) for an autotuned kernel; under
    torch.use_deterministic_algorithms, with the first config its pruning keeps instead of the
    fastest: configs tile F differently, and so sum in another order, and a timed choice can
    differ from one process to the next."""
    if not _deterministic() or len(kernel.configs) == 1:
        return kernel[grid](*args, **kwargs)
    kernel.nargs = dict(zip(kernel.arg_names, args))
    config = kernel.prune_configs(kwargs)[0]
    kernel.nargs = None
    return kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


def _t_bucket(num_tokens: int) -> int:
    return min(triton.next_power_of_2(max(num_tokens, 1)), 1 << 16)


def _f_split(num_tokens: int, size_f: int) -> int:
    """How many programs share one token tile's F range: enough that about _TARGET_PROGRAMS
    programs run when T is small (decoding), one when T alone fills the GPU. Depends on the
    shapes only (not on the tuned config), so results are the same run to run."""
    if interpreting():
        return min(2, triton.cdiv(size_f, 32))  # tests walk several F tiles and two splits
    tiles = triton.cdiv(num_tokens, 16)
    return max(1, min(_TARGET_PROGRAMS // tiles, triton.cdiv(size_f, 64), _MAX_F_SPLIT))


def _chunk_size(num_pairs: int, num_experts: int) -> int:
    """Pairs per chunk of the per-expert kernel: about an expert's fair share, so balanced
    routing gives each expert one or two chunks and a hot expert up to ~E of them."""
    if interpreting():
        return 32  # tests see experts of several chunks and chunks of several blocks
    return max(256, triton.cdiv(triton.cdiv(num_pairs, max(num_experts, 1)), 64) * 64)


def _token_grid(num_tokens, split):
    return lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]), split)


def _stacked_a(lora_a_gate, lora_a_up, acc):
    """[A_g^1 … A_g^E, A_u^1 … A_u^E] as (2·E·R, H) in the accumulation dtype."""
    num_experts, rank, hidden = lora_a_gate.shape
    return torch.cat([lora_a_gate.reshape(num_experts * rank, hidden),
                      lora_a_up.reshape(num_experts * rank, hidden)], 0).to(acc)


def _scaled_shrink(x, lora_a_gate, lora_a_up, scaling, acc):
    """s · x [A_g; A_u]^T: every expert's gate and up shrink in one GEMM, (T, 2·E·R)."""
    return (x.to(acc) @ _stacked_a(lora_a_gate, lora_a_up, acc).t()) * scaling


def _slots_to_experts(per_slot: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """(T, K, R) per-slot rows -> (T, E·R) with slot k's row added into expert e_k's block.
    One scatter per slot, in slot order: a token listing an expert twice gets both rows, in
    a fixed order (no atomics race), so the result is reproducible bitwise."""
    num_tokens, top_k, rank = per_slot.shape
    out = per_slot.new_zeros(num_tokens, num_experts, rank)
    for k in range(top_k):
        out.scatter_add_(1, indices[:, k, None, None].expand(-1, 1, rank), per_slot[:, k, None])
    return out.view(num_tokens, num_experts * rank)


def _slot_buffer(split, num_tokens, top_k, width, acc, device):
    """A (SPLIT, T, K, width) partial buffer the token kernels write in full."""
    return new_output((split, num_tokens, top_k, width), acc, device)


def _common_args(shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down):
    return (gate_base.stride(0), gate_base.stride(1), up_base.stride(0), up_base.stride(1),
            shrink.stride(0), shrink.stride(1),
            lora_b_gate.stride(0), lora_b_gate.stride(1), lora_b_gate.stride(2),
            lora_b_up.stride(0), lora_b_up.stride(1), lora_b_up.stride(2),
            lora_a_down.stride(0), lora_a_down.stride(1), lora_a_down.stride(2))


def expert_mix_forward(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                       lora_a_down, indices, weights, scaling, activation):
    """Forward launcher: the shrink GEMM, the fused token kernel, the per-slot a_d scatter.

    x:           (T, H) fp32/fp16/bf16/fp64   input of the LoRA shrinks
    gate_base:   (T, F) float                 W_g x (+ bias)
    up_base:     (T, F) float                 W_u x (+ bias)
    lora_a_gate: (E, R, H) float              lora_b_gate: (E, F, R) float
    lora_a_up:   (E, R, H) float              lora_b_up:   (E, F, R) float
    lora_a_down: (E, R, F) float
    indices:     (T, K) int64                 chosen experts
    weights:     (T, K) float                 mixing weights
    scaling:     float                        s = lora_alpha / r
    activation:  str                          one of gmoe_kernels.activations.ACTIVATIONS
    returns h_c: (T, F) x.dtype and z: (T, E·R) x.dtype (w_k A_d^{e_k} h_k in block e_k).
    Any strides; every sum in fp32 (fp64 for fp64 x).
    """
    activation = canonical_activation(activation)
    check_expert_mix(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                     lora_a_down, indices, weights, activation)
    num_tokens, size_f = gate_base.shape
    num_experts, rank, _ = lora_a_gate.shape
    top_k = indices.shape[1]
    acc = compute_dtype(x)
    h_c = new_output((num_tokens, size_f), x.dtype, x.device)
    if num_tokens == 0 or size_f == 0 or top_k == 0:
        return h_c.zero_(), x.new_zeros((num_tokens, num_experts * rank))
    shrink = _scaled_shrink(x, lora_a_gate, lora_a_up, scaling, acc)
    split = _f_split(num_tokens, size_f)
    slot_a_d = _slot_buffer(split, num_tokens, top_k, rank, acc, x.device)
    dtypes = (x.dtype, lora_b_gate.dtype, lora_b_up.dtype, lora_a_down.dtype)
    mode = expand_mode(num_experts, rank, dtypes, top_k, x.shape[1])
    if mode == "grouped":
        h_c.copy_(_grouped_forward(shrink, gate_base, up_base, lora_b_gate, lora_b_up,
                                   lora_a_down, indices, weights, slot_a_d, split, activation,
                                   acc, _dot_dtype(dtypes, acc)))
    else:
        kernel, extra = _token_kernel_launch(_fwd_kernel, _fwd_dot_kernel, mode, dtypes, acc)
        _launch(kernel, _token_grid(num_tokens, split),
            gate_base, up_base, shrink, lora_b_gate, lora_b_up, lora_a_down, indices, weights,
            h_c, slot_a_d,
            num_tokens, size_f, num_experts * rank, _t_bucket(num_tokens),
            *_common_args(shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down),
            indices.stride(0), indices.stride(1), weights.stride(0), weights.stride(1),
            h_c.stride(0), h_c.stride(1),
            K=top_k, R=rank, ACTIVATION=activation, R_PAD=_r_pad_token(rank),
            K_PAD=triton.next_power_of_2(top_k), ACC_FP64=acc == torch.float64, **extra)
    z = _slots_to_experts(slot_a_d.sum(0), indices, num_experts)
    return h_c, z.to(x.dtype)


def _per_expert_constexprs(top_k, rank, num_experts, activation, acc, dot_dtype) -> dict:
    """The constexprs of the kernels that multiply by R with tl.dot (per-expert, grouped)."""
    return dict(K=top_k, R=rank, ACTIVATION=activation, R_PAD=_r_pad(rank),
                E_PAD=triton.next_power_of_2(num_experts), ACC_FP64=acc == torch.float64,
                DOT_DTYPE=dot_dtype)


def _tile_table(plan, tile: int):
    """(tile_offsets (E+1,) int64, number of programs): expert e owns tiles tile_offsets[e] ..
    [e+1]-1 of at most `tile` pairs each. The program count E + P // tile bounds
    sum_e ceil(n_e / tile) without reading the counts on the host."""
    num_experts = plan.num_experts
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=plan.expert_offsets.device)
    offsets[1:] = torch.cumsum((plan.expert_counts() + tile - 1) // tile, 0)
    return offsets, num_experts + plan.num_tokens * plan.top_k // tile


def _grouped_args(shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down, plan,
                  weights):
    tile_offsets, programs = _tile_table(plan, _GROUPED_BLOCK_P)
    tensors = (gate_base, up_base, shrink, lora_b_gate, lora_b_up, lora_a_down,
               plan.sorted_pairs, plan.expert_offsets, tile_offsets, weights)
    return tensors, programs


def _grouped_forward(shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down, indices,
                     weights, slot_a_d, split, activation, acc, dot_dtype):
    """The grouped forward kernel; returns h_c summed in an fp32 (T, F) buffer."""
    num_tokens, size_f = gate_base.shape
    num_experts, rank, _ = lora_a_down.shape
    plan = make_routing_plan(indices, num_experts)
    tensors, programs = _grouped_args(shrink, gate_base, up_base, lora_b_gate, lora_b_up,
                                      lora_a_down, plan, weights)
    h_c32 = torch.zeros((num_tokens, size_f), dtype=acc, device=gate_base.device)
    _fwd_grouped_kernel[(programs, split)](
        *tensors, h_c32, slot_a_d, num_tokens, num_experts, size_f, num_experts * rank,
        _t_bucket(num_tokens),
        *_common_args(shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down),
        weights.stride(0), weights.stride(1), h_c32.stride(0), h_c32.stride(1),
        **_per_expert_constexprs(indices.shape[1], rank, num_experts, activation, acc, dot_dtype),
        BLOCK_P=_GROUPED_BLOCK_P)
    return h_c32


def _grouped_backward(shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down, indices,
                      plan, weights, grad_h_c, grad_z, slot_dsg, slot_dsu, slot_dw, split,
                      activation, acc, dot_dtype):
    """The grouped backward kernel; returns dG, dU summed in fp32 (T, F) buffers."""
    num_tokens, size_f = gate_base.shape
    num_experts, rank, _ = lora_a_down.shape
    tensors, programs = _grouped_args(shrink, gate_base, up_base, lora_b_gate, lora_b_up,
                                      lora_a_down, plan, weights)
    d_gate32 = torch.zeros((num_tokens, size_f), dtype=acc, device=gate_base.device)
    d_up32 = torch.zeros_like(d_gate32)
    _bwd_grouped_kernel[(programs, split)](
        *tensors, grad_h_c, grad_z, d_gate32, d_up32, slot_dsg, slot_dsu, slot_dw,
        num_tokens, num_experts, size_f, num_experts * rank, _t_bucket(num_tokens),
        *_common_args(shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down),
        weights.stride(0), weights.stride(1), grad_h_c.stride(0), grad_h_c.stride(1),
        grad_z.stride(0), grad_z.stride(1), d_gate32.stride(0), d_gate32.stride(1),
        d_up32.stride(0), d_up32.stride(1),
        **_per_expert_constexprs(indices.shape[1], rank, num_experts, activation, acc, dot_dtype),
        BLOCK_P=_GROUPED_BLOCK_P)
    return d_gate32, d_up32


def _expert_weight_grads(shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down,
                         indices, plan, weights, grad_h_c, grad_z, activation, acc, dot_dtype):
    """dB_g, dB_u, dA_d: the per-expert kernel over chunks of each expert's pairs, then the
    chunk partials summed per expert in chunk order (deterministic; zeros for an empty expert)."""
    num_tokens, size_f = gate_base.shape
    num_experts, rank, _ = lora_a_down.shape
    top_k = indices.shape[1]
    device = gate_base.device
    chunk = _chunk_size(num_tokens * top_k, num_experts)
    chunk_offsets, max_chunks = _tile_table(plan, chunk)
    parts = [new_output((max_chunks, size_f, rank), acc, device) for _ in range(2)]
    parts.append(new_output((max_chunks, rank, size_f), acc, device))
    _launch(_bwd_expert_kernel, lambda meta: (max_chunks, triton.cdiv(size_f, meta["BLOCK_F"])),
        gate_base, up_base, shrink, lora_b_gate, lora_b_up, lora_a_down,
        plan.sorted_pairs, plan.expert_offsets, chunk_offsets, weights, grad_h_c, grad_z,
        *parts, num_experts, size_f, num_experts * rank, chunk, _t_bucket(num_tokens),
        *_common_args(shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down),
        weights.stride(0), weights.stride(1),
        grad_h_c.stride(0), grad_h_c.stride(1), grad_z.stride(0), grad_z.stride(1),
        **_per_expert_constexprs(top_k, rank, num_experts, activation, acc, dot_dtype))
    grads = []
    for part, like in zip(parts, (lora_b_gate, lora_b_up, lora_a_down)):
        out = new_output(like.shape, like.dtype, device)
        width = size_f * rank
        kernels._sum_chunks_kernel[(num_experts, triton.cdiv(width, _SUM_BLOCK))](
            part, chunk_offsets, out, width, BLOCK=_SUM_BLOCK)
        grads.append(out)
    return grads


def expert_mix_backward(grad_h_c, grad_z, x, gate_base, up_base, lora_a_gate, lora_b_gate,
                        lora_a_up, lora_b_up, lora_a_down, indices, weights, scaling,
                        activation):
    """Backward launcher: the token kernel, the per-expert kernels, then small torch GEMMs.

    grad_h_c: (T, F) float       dL/dh_c
    grad_z:   (T, E·R) float     dL/dz
    x … activation: as in `expert_mix_forward` (the saved forward inputs)
    returns (dx (T, H), d_gate_base (T, F), d_up_base (T, F), d_lora_a_gate (E, R, H),
             d_lora_b_gate (E, F, R), d_lora_a_up (E, R, H), d_lora_b_up (E, F, R),
             d_lora_a_down (E, R, F), d_weights (T, K)), each in its input's dtype.
    """
    activation = canonical_activation(activation)
    num_tokens, size_f = gate_base.shape
    num_experts, rank, hidden = lora_a_gate.shape
    top_k = indices.shape[1]
    acc = compute_dtype(x)
    device = x.device
    dtypes = (x.dtype, lora_b_gate.dtype, lora_b_up.dtype, lora_a_down.dtype)
    if num_tokens == 0 or size_f == 0 or top_k == 0:
        zeros = [torch.zeros_like(t) for t in (x, gate_base, up_base, lora_a_gate, lora_b_gate,
                                               lora_a_up, lora_b_up, lora_a_down, weights)]
        return tuple(zeros)
    d_gate_base = new_output((num_tokens, size_f), gate_base.dtype, device)
    d_up_base = new_output((num_tokens, size_f), up_base.dtype, device)
    split = _f_split(num_tokens, size_f)
    slot_dw = _slot_buffer(split, num_tokens, top_k, 1, acc, device)
    slot_dsg = _slot_buffer(split, num_tokens, top_k, rank, acc, device)
    slot_dsu = _slot_buffer(split, num_tokens, top_k, rank, acc, device)
    shrink = _scaled_shrink(x, lora_a_gate, lora_a_up, scaling, acc)
    common = _common_args(shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down)
    mode = expand_mode(num_experts, rank, dtypes, top_k, hidden)
    plan = make_routing_plan(indices, num_experts)   # one plan for both per-expert kernels
    if mode == "grouped":
        d_gate32, d_up32 = _grouped_backward(
            shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down, indices, plan, weights,
            grad_h_c, grad_z, slot_dsg, slot_dsu, slot_dw, split, activation, acc,
            _dot_dtype(dtypes, acc))
        d_gate_base.copy_(d_gate32)
        d_up_base.copy_(d_up32)
    else:
        kernel, extra = _token_kernel_launch(_bwd_token_kernel, _bwd_token_dot_kernel, mode,
                                             dtypes, acc)
        _launch(kernel, _token_grid(num_tokens, split),
            gate_base, up_base, shrink, lora_b_gate, lora_b_up, lora_a_down, indices, weights,
            grad_h_c, grad_z, d_gate_base, d_up_base, slot_dsg, slot_dsu, slot_dw,
            num_tokens, size_f, num_experts * rank, _t_bucket(num_tokens), *common,
            indices.stride(0), indices.stride(1), weights.stride(0), weights.stride(1),
            grad_h_c.stride(0), grad_h_c.stride(1), grad_z.stride(0), grad_z.stride(1),
            d_gate_base.stride(0), d_gate_base.stride(1), d_up_base.stride(0),
            d_up_base.stride(1),
            K=top_k, R=rank, ACTIVATION=activation, R_PAD=_r_pad_token(rank),
            K_PAD=triton.next_power_of_2(top_k),
            ACC_FP64=acc == torch.float64, **extra)
    d_b_gate, d_b_up, d_a_down = _expert_weight_grads(
        shrink, gate_base, up_base, lora_b_gate, lora_b_up, lora_a_down, indices, plan, weights,
        grad_h_c, grad_z, activation, acc, _dot_dtype(dtypes, acc))
    n_cols = num_experts * rank
    d_shrink = torch.cat([_slots_to_experts(slot_dsg.sum(0), indices, num_experts),
                          _slots_to_experts(slot_dsu.sum(0), indices, num_experts)], 1) * scaling
    xf = x.to(acc)
    d_x = (d_shrink @ _stacked_a(lora_a_gate, lora_a_up, acc)).to(x.dtype)
    d_a_gate = (d_shrink[:, :n_cols].t() @ xf).view(num_experts, rank, hidden)
    d_a_up = (d_shrink[:, n_cols:].t() @ xf).view(num_experts, rank, hidden)
    d_weights = slot_dw.sum(0).view(num_tokens, top_k)
    return (d_x, d_gate_base, d_up_base, d_a_gate.to(lora_a_gate.dtype), d_b_gate,
            d_a_up.to(lora_a_up.dtype), d_b_up, d_a_down, d_weights.to(weights.dtype))


class ExpertMixFunction(torch.autograd.Function):
    """Fused expert mix, Triton backend (same maths as the reference ExpertMixFunction).

    Forward: h_c[t] = sum_k w_k h_k, z[t, e_k] = w_k A_d^{e_k} h_k with
      g_k = G[t] + s B_g^{e_k} A_g^{e_k} x_t,  u_k = U[t] + s B_u^{e_k} A_u^{e_k} x_t,
      h_k = act(g_k) * u_k.
    Saved: x, G, U, the LoRA weights, indices, weights (g_k, u_k, h_k are recomputed).
    Backward (dh_c = dL/dh_c, b_k = dL/dz[t, e_k]; pair k of token t routed to expert e):
      q_k    = dh_c[t] + A_d^e^T b_k;        dh_k = w_k q_k
      dw_k   = <h_k, q_k> = <h_k, dh_c[t]> + <A_d^e h_k, b_k>
      dA_d^e = sum_{k: e_k = e} w_k b_k h_k^T
      dg_k   = dh_k * u_k * act'(g_k);        du_k = dh_k * act(g_k)
      dG[t]  = sum_k dg_k;                    dU[t] = sum_k du_k
      d(A_g^e x_t) = s B_g^e^T dg_k;          dB_g^e = s sum_k dg_k (A_g^e x_t)^T  (up likewise)
      dA_g^e = sum_t d(A_g^e x_t) x_t^T;      dx = sum_e d(A_g^e x)^T A_g^e + (up)
    No gradient for indices, scaling, activation.
    """

    @staticmethod
    def forward(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                lora_a_down, indices, weights, scaling, activation):
        return expert_mix_forward(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up,
                                  lora_b_up, lora_a_down, indices, weights, scaling, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up, lora_a_down,
         indices, weights, scaling, activation) = inputs
        ctx.save_for_backward(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up,
                              lora_b_up, lora_a_down, indices, weights)
        ctx.scaling = float(scaling)
        ctx.activation = activation

    @staticmethod
    def backward(ctx, grad_h_c, grad_z):
        saved = ctx.saved_tensors
        x, gate_base, lora_a_gate = saved[0], saved[1], saved[3]
        num_experts, rank, _ = lora_a_gate.shape
        if grad_h_c is None:
            grad_h_c = torch.zeros_like(gate_base, dtype=x.dtype)
        if grad_z is None:
            grad_z = x.new_zeros((x.shape[0], num_experts * rank))
        grads = torch.ops.gmoe_kernels.expert_mix_backward(
            grad_h_c, grad_z, *saved, ctx.scaling, ctx.activation)
        need = ctx.needs_input_grad
        d_x, d_gb, d_ub, d_ag, d_bg, d_au, d_bu, d_ad, d_w = (
            g if needed else None for g, needed in zip(grads, need[:8] + need[9:10]))
        return d_x, d_gb, d_ub, d_ag, d_bg, d_au, d_bu, d_ad, None, d_w, None, None


@torch.library.custom_op("gmoe_kernels::expert_mix", mutates_args=())
def _expert_mix_op(x: torch.Tensor, gate_base: torch.Tensor, up_base: torch.Tensor,
                   lora_a_gate: torch.Tensor, lora_b_gate: torch.Tensor,
                   lora_a_up: torch.Tensor, lora_b_up: torch.Tensor,
                   lora_a_down: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                   scaling: float, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return expert_mix_forward(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up,
                              lora_b_up, lora_a_down, indices, weights, scaling, activation)


@_expert_mix_op.register_fake
def _expert_mix_fake(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
                     lora_a_down, indices, weights, scaling, activation):
    num_experts, rank, _ = lora_a_gate.shape
    return (x.new_empty((x.shape[0], gate_base.shape[1])),
            x.new_empty((x.shape[0], num_experts * rank)))


@torch.library.custom_op("gmoe_kernels::expert_mix_backward", mutates_args=())
def _expert_mix_backward_op(
        grad_h_c: torch.Tensor, grad_z: torch.Tensor, x: torch.Tensor,
        gate_base: torch.Tensor, up_base: torch.Tensor, lora_a_gate: torch.Tensor,
        lora_b_gate: torch.Tensor, lora_a_up: torch.Tensor, lora_b_up: torch.Tensor,
        lora_a_down: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
        scaling: float, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return expert_mix_backward(grad_h_c, grad_z, x, gate_base, up_base, lora_a_gate,
                               lora_b_gate, lora_a_up, lora_b_up, lora_a_down, indices,
                               weights, scaling, activation)


@_expert_mix_backward_op.register_fake
def _expert_mix_backward_fake(grad_h_c, grad_z, x, gate_base, up_base, lora_a_gate,
                              lora_b_gate, lora_a_up, lora_b_up, lora_a_down, indices,
                              weights, scaling, activation):
    return tuple(torch.empty_like(t) for t in (x, gate_base, up_base, lora_a_gate, lora_b_gate,
                                               lora_a_up, lora_b_up, lora_a_down, weights))


_expert_mix_op.register_autograd(ExpertMixFunction.backward,
                                 setup_context=ExpertMixFunction.setup_context)


def expert_mix(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up, lora_b_up,
               lora_a_down, indices, weights, scaling: float, activation: str):
    """Triton backend of `gmoe_kernels.functional.expert_mix` (the custom op
    `torch.ops.gmoe_kernels.expert_mix`, differentiable, traceable by torch.compile).

    x:           (T, H) fp32/fp16/bf16 (fp64 for gradcheck)
    gate_base:   (T, F) float      up_base:     (T, F) float
    lora_a_gate: (E, R, H) float   lora_b_gate: (E, F, R) float
    lora_a_up:   (E, R, H) float   lora_b_up:   (E, F, R) float
    lora_a_down: (E, R, F) float
    indices:     (T, K) int64      weights:     (T, K) float
    scaling:     float             activation:  str (a gmoe_kernels.activations name or alias)
    returns h_c (T, F) and z (T, E·R), both in x's dtype.
    """
    activation = canonical_activation(activation)
    return torch.ops.gmoe_kernels.expert_mix(x, gate_base, up_base, lora_a_gate, lora_b_gate,
                                             lora_a_up, lora_b_up, lora_a_down, indices,
                                             weights, float(scaling), activation)


__all__ = ["ExpertMixFunction", "expert_mix", "expert_mix_backward",
           "expert_mix_forward"]
