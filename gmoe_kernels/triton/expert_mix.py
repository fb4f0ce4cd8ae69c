"""Triton backend of the fused expert mix: launchers and the op's torch.library registration.

Shapes use DESIGN.md's letters (T tokens, H hidden, F intermediate, E experts, K top-k,
R LoRA rank); `expert_mix` has exactly the signature and results of
gmoe_kernels.reference.expert_mix.expert_mix.

Three variants of the token kernels (steps 2 and 3), chosen per call by
`expert_mix_configs.expand_mode`: "gather" (_expert_mix_kernels: each token's B^{e_k} rows
gathered, reduced over R on CUDA cores), "dot" (_expert_mix_dot_kernels: one-hot tl.dot
against all experts' stacked matrices) and "grouped" (_expert_mix_grouped_kernels: pair tiles
of one expert, dense tl.dot, fp32 atomics for the sums over slots). Same arguments, same
results; the tests run all three.

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
torch.use_deterministic_algorithms the config is fixed too (`_common.launch`) and grouped,
whose slot sums are atomics, is never picked: the results are then bitwise reproducible.
Saved for backward: x, G, U, the LoRA weights, indices, weights; the shrink GEMM and the
routing plan are recomputed in backward (both small).

Block sizes: R is padded inside the kernels with masks, to R_PAD = max(2, next_pow2(R)) in
the gather and dot kernels and max(16, next_pow2(R)) where tl.dot multiplies by R (the
per-expert and grouped kernels). K and R are constexprs. Configs, their pruning (by shapes,
dtypes and the target) and the launch geometry are in expert_mix_configs; every launch passes
its arguments by keyword.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..activations import canonical_activation, compute_dtype
from ..checks import check_expert_mix
from ..expert_mix_op import register_expert_mix
from . import _expert_mix_dot_kernels as dot_kernels
from . import _expert_mix_grouped_kernels as grouped_kernels
from . import _expert_mix_kernels as kernels
from . import expert_mix_configs as configs
from ._common import launch, new_output, strides
from .routing import make_routing_plan

__all__ = ["expert_mix", "expert_mix_backward", "expert_mix_forward"]

_TOKEN_CONFIGS = configs.token_configs()
_DOT_CONFIGS = configs.dot_configs()
_EXPERT_CONFIGS = configs.expert_configs()
_GROUPED_CONFIGS = {d: configs.grouped_configs(d) for d in ("forward", "backward")}
_TOKEN_KERNELS = {("gather", "forward"): kernels._expert_mix_fwd_kernel,
                  ("gather", "backward"): kernels._expert_mix_bwd_token_kernel,
                  ("dot", "forward"): dot_kernels._expert_mix_fwd_dot_kernel,
                  ("dot", "backward"): dot_kernels._expert_mix_bwd_token_dot_kernel}


@dataclass
class _Call:
    """One call's kernel operands (shrink, G, U, B_g, B_u, A_d, indices, weights) and sizes."""

    shrink: torch.Tensor
    gate_base: torch.Tensor
    up_base: torch.Tensor
    lora_b_gate: torch.Tensor
    lora_b_up: torch.Tensor
    lora_a_down: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    activation: str
    compute: torch.dtype   # accumulation dtype: fp32, fp64 for fp64 x
    dtypes: tuple          # x's and the LoRA weights' dtypes (which dot operands fit)

    @property
    def sizes(self):
        """(T, F, E, R, K)."""
        num_experts, rank, size_f = self.lora_a_down.shape
        return self.gate_base.shape[0], size_f, num_experts, rank, self.indices.shape[1]

    def dot_dtype(self):
        return configs.dot_dtype(self.dtypes, self.compute)

    def operands(self) -> dict:
        """Pointers and strides of the operands every expert-mix kernel reads."""
        num_tokens, size_f, num_experts, rank, _ = self.sizes
        return dict(
            gate_base_ptr=self.gate_base, up_base_ptr=self.up_base, shrink_ptr=self.shrink,
            lora_b_gate_ptr=self.lora_b_gate, lora_b_up_ptr=self.lora_b_up,
            lora_a_down_ptr=self.lora_a_down, weights_ptr=self.weights,
            F=size_f, UP_OFFSET=num_experts * rank, T_BUCKET=configs.t_bucket(num_tokens),
            **strides("gate_base", self.gate_base, "tf"), **strides("up_base", self.up_base, "tf"),
            **strides("shrink", self.shrink, "tc"),
            **strides("lora_b_gate", self.lora_b_gate, "efr"),
            **strides("lora_b_up", self.lora_b_up, "efr"),
            **strides("lora_a_down", self.lora_a_down, "erf"),
            **strides("weights", self.weights, "tk"),
            K=self.indices.shape[1], R=rank, ACTIVATION=self.activation,
            ACC_FP64=self.compute == torch.float64)

    def per_expert_constexprs(self) -> dict:
        """The constexprs of the kernels that multiply by R with tl.dot (per-expert, grouped)."""
        _, _, num_experts, rank, _ = self.sizes
        return dict(R_PAD=configs.r_pad(rank), E_PAD=triton.next_power_of_2(num_experts),
                    DOT_DTYPE=self.dot_dtype())


def _launch_token_kernel(call: _Call, mode: str, direction: str, split: int, **arguments):
    """The gather or dot token kernel over (token tile, F split), configs pruned for it."""
    num_tokens, _, num_experts, rank, top_k = call.sizes
    r_pad, k_pad = configs.r_pad_token(rank), triton.next_power_of_2(top_k)
    if mode == "gather":
        wide = call.gate_base.dtype == torch.float32   # fp32 loads: half the register budget
        kept = configs.prune_token_configs(_TOKEN_CONFIGS, direction, r_pad, k_pad, wide)
        key, extra = configs.TOKEN_KEY, {}
    else:
        kept = configs.prune_dot_configs(_DOT_CONFIGS, direction, num_experts * rank, r_pad, k_pad)
        key, extra = configs.DOT_KEY, {"DOT_DTYPE": call.dot_dtype()}
    launch(_TOKEN_KERNELS[(mode, direction)],
           lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]), split), kept, key,
           **call.operands(), indices_ptr=call.indices, **strides("indices", call.indices, "tk"),
           T=num_tokens, R_PAD=r_pad, K_PAD=k_pad, **extra, **arguments)


def _stacked_a(lora_a_gate, lora_a_up, compute):
    """[A_g^1 … A_g^E, A_u^1 … A_u^E] as (2·E·R, H) in the accumulation dtype."""
    num_experts, rank, hidden = lora_a_gate.shape
    return torch.cat([lora_a_gate.reshape(num_experts * rank, hidden),
                      lora_a_up.reshape(num_experts * rank, hidden)], 0).to(compute)


def _scaled_shrink(x, lora_a_gate, lora_a_up, scaling, compute):
    """s · x [A_g; A_u]^T: every expert's gate and up shrink in one GEMM, (T, 2·E·R)."""
    return (x.to(compute) @ _stacked_a(lora_a_gate, lora_a_up, compute).t()) * scaling


def _slots_to_experts(per_slot: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """(T, K, R) per-slot rows -> (T, E·R) with slot k's row added into expert e_k's block.
    One scatter per slot, in slot order: a token listing an expert twice gets both rows, in
    a fixed order (no atomics race), so the result is reproducible bitwise."""
    num_tokens, top_k, rank = per_slot.shape
    out = per_slot.new_zeros(num_tokens, num_experts, rank)
    for k in range(top_k):
        out.scatter_add_(1, indices[:, k, None, None].expand(-1, 1, rank), per_slot[:, k, None])
    return out.view(num_tokens, num_experts * rank)


def _slot_buffer(split, num_tokens, top_k, width, compute, device):
    """A (SPLIT, T, K, width) partial buffer the token kernels write in full."""
    return new_output((split, num_tokens, top_k, width), compute, device)


def _tile_table(plan, tile: int):
    """(tile_offsets (E+1,) int64, number of programs): expert e owns tiles tile_offsets[e] ..
    [e+1]-1 of at most `tile` pairs each. The program count E + P // tile bounds
    sum_e ceil(n_e / tile) without reading the counts on the host."""
    num_experts = plan.num_experts
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=plan.expert_offsets.device)
    offsets[1:] = torch.cumsum((plan.expert_counts() + tile - 1) // tile, 0)
    return offsets, num_experts + plan.num_tokens * plan.top_k // tile


def _launch_grouped_kernel(call: _Call, plan, direction: str, split: int, **arguments):
    """The grouped kernel over (pair tile of one expert, F split); its slot sums are atomics
    into the zeroed buffers `arguments` names in `reset`."""
    kernel = (grouped_kernels._expert_mix_fwd_grouped_kernel if direction == "forward"
              else grouped_kernels._expert_mix_bwd_grouped_kernel)
    reset = ("h_c_ptr",) if direction == "forward" else ("d_gate_base_ptr", "d_up_base_ptr")
    tile_offsets, programs = _tile_table(plan, configs.GROUPED_BLOCK_P)
    num_tokens, _, num_experts, _, _ = call.sizes
    launch(kernel, (programs, split), _GROUPED_CONFIGS[direction], configs.GROUPED_KEY, reset,
           **call.operands(), **call.per_expert_constexprs(), sorted_pairs_ptr=plan.sorted_pairs,
           expert_offsets_ptr=plan.expert_offsets, tile_offsets_ptr=tile_offsets, T=num_tokens,
           E=num_experts, BLOCK_P=configs.GROUPED_BLOCK_P, **arguments)


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
    compute = compute_dtype(x)
    h_c = new_output((num_tokens, size_f), x.dtype, x.device)
    if num_tokens == 0 or size_f == 0 or top_k == 0:
        return h_c.zero_(), x.new_zeros((num_tokens, num_experts * rank))
    call = _Call(_scaled_shrink(x, lora_a_gate, lora_a_up, scaling, compute), gate_base,
                 up_base, lora_b_gate, lora_b_up, lora_a_down, indices, weights, activation,
                 compute, (x.dtype, lora_b_gate.dtype, lora_b_up.dtype, lora_a_down.dtype))
    split = configs.f_split(num_tokens, size_f)
    slot_a_d = _slot_buffer(split, num_tokens, top_k, rank, compute, x.device)
    mode = configs.expand_mode(num_experts, rank, call.dtypes, top_k, x.shape[1])
    if mode == "grouped":
        h_c32 = torch.zeros((num_tokens, size_f), dtype=compute, device=x.device)
        _launch_grouped_kernel(call, make_routing_plan(indices, num_experts), "forward", split,
                               h_c_ptr=h_c32, slot_a_d_ptr=slot_a_d, **strides("h_c", h_c32, "tf"))
        h_c.copy_(h_c32)
    else:
        _launch_token_kernel(call, mode, "forward", split, h_c_ptr=h_c, slot_a_d_ptr=slot_a_d,
                             **strides("h_c", h_c, "tf"))
    z = _slots_to_experts(slot_a_d.sum(0), indices, num_experts)
    return h_c, z.to(x.dtype)


def _expert_weight_grads(call: _Call, plan, grad_h_c, grad_z, target: int):
    """dB_g, dB_u, dA_d: the per-expert kernel over chunks of each expert's pairs, then the
    chunk partials summed per expert in chunk order (deterministic; zeros for an empty expert)."""
    num_tokens, size_f, num_experts, rank, top_k = call.sizes
    device = call.gate_base.device
    chunk = configs.chunk_size(num_tokens * top_k, num_experts)
    chunk_offsets, max_chunks = _tile_table(plan, chunk)
    parts = [new_output((max_chunks, size_f, rank), call.compute, device) for _ in range(2)]
    parts.append(new_output((max_chunks, rank, size_f), call.compute, device))
    kept = configs.prune_expert_configs(_EXPERT_CONFIGS, target, call.dot_dtype())
    launch(kernels._expert_mix_bwd_expert_kernel,
           lambda meta: (max_chunks, triton.cdiv(size_f, meta["BLOCK_F"])), kept,
           configs.EXPERT_KEY, **call.operands(), **call.per_expert_constexprs(),
           sorted_pairs_ptr=plan.sorted_pairs, expert_offsets_ptr=plan.expert_offsets,
           chunk_offsets_ptr=chunk_offsets, grad_h_c_ptr=grad_h_c, grad_z_ptr=grad_z,
           part_b_gate_ptr=parts[0], part_b_up_ptr=parts[1], part_a_down_ptr=parts[2],
           E=num_experts, CHUNK=chunk, **strides("grad_h_c", grad_h_c, "tf"),
           **strides("grad_z", grad_z, "tc"))
    grads = []
    for part, like in zip(parts, (call.lora_b_gate, call.lora_b_up, call.lora_a_down)):
        out = new_output(like.shape, like.dtype, device)
        width = size_f * rank
        kernels._sum_chunks_kernel[(num_experts, triton.cdiv(width, configs.SUM_BLOCK))](
            part_ptr=part, chunk_offsets_ptr=chunk_offsets, out_ptr=out, M=width,
            BLOCK=configs.SUM_BLOCK)
        grads.append(out)
    return grads


def expert_mix_backward(grad_h_c, grad_z, x, gate_base, up_base, lora_a_gate, lora_b_gate,
                        lora_a_up, lora_b_up, lora_a_down, indices, weights, scaling,
                        activation, *, target: int | None = None):
    """Backward launcher: the token kernel, the per-expert kernels, then small torch GEMMs.

    grad_h_c: (T, F) float       dL/dh_c
    grad_z:   (T, E·R) float     dL/dz
    x … activation: as in `expert_mix_forward` (the saved forward inputs)
    target:   int                the compute capability (90, 80) configs are pruned for;
                                 default: the current device's (`expert_mix_configs.device_target`)
    returns (dx (T, H), d_gate_base (T, F), d_up_base (T, F), d_lora_a_gate (E, R, H),
             d_lora_b_gate (E, F, R), d_lora_a_up (E, R, H), d_lora_b_up (E, F, R),
             d_lora_a_down (E, R, F), d_weights (T, K)), each in its input's dtype.
    """
    activation = canonical_activation(activation)
    num_tokens, size_f = gate_base.shape
    num_experts, rank, hidden = lora_a_gate.shape
    top_k = indices.shape[1]
    compute = compute_dtype(x)
    device = x.device
    if num_tokens == 0 or size_f == 0 or top_k == 0:
        return tuple(torch.zeros_like(t) for t in (x, gate_base, up_base, lora_a_gate, lora_b_gate,
                                                   lora_a_up, lora_b_up, lora_a_down, weights))
    target = configs.device_target(device) if target is None else target
    call = _Call(_scaled_shrink(x, lora_a_gate, lora_a_up, scaling, compute), gate_base,
                 up_base, lora_b_gate, lora_b_up, lora_a_down, indices, weights, activation,
                 compute, (x.dtype, lora_b_gate.dtype, lora_b_up.dtype, lora_a_down.dtype))
    d_gate_base = new_output((num_tokens, size_f), gate_base.dtype, device)
    d_up_base = new_output((num_tokens, size_f), up_base.dtype, device)
    split = configs.f_split(num_tokens, size_f)
    slots = dict(
        slot_d_weights_ptr=_slot_buffer(split, num_tokens, top_k, 1, compute, device),
        slot_d_shrink_gate_ptr=_slot_buffer(split, num_tokens, top_k, rank, compute, device),
        slot_d_shrink_up_ptr=_slot_buffer(split, num_tokens, top_k, rank, compute, device))
    grads_in = dict(grad_h_c_ptr=grad_h_c, grad_z_ptr=grad_z, **strides("grad_h_c", grad_h_c, "tf"),
                    **strides("grad_z", grad_z, "tc"))
    mode = configs.expand_mode(num_experts, rank, call.dtypes, top_k, hidden)
    plan = make_routing_plan(indices, num_experts)   # one plan for both per-expert kernels
    if mode == "grouped":
        d_gate32 = torch.zeros((num_tokens, size_f), dtype=compute, device=device)
        d_up32 = torch.zeros_like(d_gate32)
        _launch_grouped_kernel(call, plan, "backward", split, **grads_in, **slots,
                               d_gate_base_ptr=d_gate32, d_up_base_ptr=d_up32,
                               **strides("d_gate_base", d_gate32, "tf"),
                               **strides("d_up_base", d_up32, "tf"))
        d_gate_base.copy_(d_gate32)
        d_up_base.copy_(d_up32)
    else:
        _launch_token_kernel(call, mode, "backward", split, **grads_in, **slots,
                             d_gate_base_ptr=d_gate_base, d_up_base_ptr=d_up_base,
                             **strides("d_gate_base", d_gate_base, "tf"),
                             **strides("d_up_base", d_up_base, "tf"))
    d_b_gate, d_b_up, d_a_down = _expert_weight_grads(call, plan, grad_h_c, grad_z, target)
    n_cols = num_experts * rank
    d_shrink = torch.cat([
        _slots_to_experts(slots["slot_d_shrink_gate_ptr"].sum(0), indices, num_experts),
        _slots_to_experts(slots["slot_d_shrink_up_ptr"].sum(0), indices, num_experts)], 1) * scaling
    x_compute = x.to(compute)
    d_x = (d_shrink @ _stacked_a(lora_a_gate, lora_a_up, compute)).to(x.dtype)
    d_a_gate = (d_shrink[:, :n_cols].t() @ x_compute).view(num_experts, rank, hidden)
    d_a_up = (d_shrink[:, n_cols:].t() @ x_compute).view(num_experts, rank, hidden)
    d_weights = slots["slot_d_weights_ptr"].sum(0).view(num_tokens, top_k)
    return (d_x, d_gate_base, d_up_base, d_a_gate.to(lora_a_gate.dtype), d_b_gate,
            d_a_up.to(lora_a_up.dtype), d_b_up, d_a_down, d_weights.to(weights.dtype))


# The op's signature, fakes and autograd rule: gmoe_kernels.expert_mix_op.
_expert_mix_op = register_expert_mix("expert_mix", expert_mix_forward, expert_mix_backward)


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
    return _expert_mix_op(x, gate_base, up_base, lora_a_gate, lora_b_gate, lora_a_up,
                          lora_b_up, lora_a_down, indices, weights, float(scaling), activation)
