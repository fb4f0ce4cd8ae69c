"""Routing metadata shared by every backend: which (token, slot) pairs go to which expert.

A small dataclass that checks its own dtypes and shapes, so a kernel never receives
metadata it would silently misread, and that every pair is placed (see `__post_init__`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingPlan:
    """The T·K (token, slot) pairs of a top-K routing, grouped by expert.

    Fields (P = T·K pairs, flattened as pair = token·K + slot):
      sorted_pairs:   (P,) int64   pair ids ordered by expert (stable: ascending pair id within an expert)
      expert_offsets: (E+1,) int64 expert e owns sorted_pairs[expert_offsets[e]:expert_offsets[e+1]]
      inverse:        (P,) int64   position of each pair in sorted_pairs (sorted_pairs[inverse[p]] == p)
      num_tokens, top_k, num_experts: the routing's sizes
    """

    sorted_pairs: torch.Tensor
    expert_offsets: torch.Tensor
    inverse: torch.Tensor
    num_tokens: int
    top_k: int
    num_experts: int

    def __post_init__(self) -> None:
        pairs = self.num_tokens * self.top_k
        for name, t, n in (
            ("sorted_pairs", self.sorted_pairs, pairs),
            ("expert_offsets", self.expert_offsets, self.num_experts + 1),
            ("inverse", self.inverse, pairs),
        ):
            if t.dtype != torch.int64:
                raise TypeError(f"RoutingPlan.{name} must be int64, got {t.dtype}")
            if t.shape != (n,):
                raise ValueError(f"RoutingPlan.{name} must have shape ({n},), got {tuple(t.shape)}")
        # The plan kernels skip expert ids outside [0, E): such a pair is never counted, so
        # the offsets stop short of P and `inverse` keeps that pair's slot unwritten, which
        # combine/dispatch would then read out of bounds. A device-side assertion (no host
        # synchronisation on a GPU; an immediate RuntimeError on a CPU) catches exactly that.
        if pairs > 0 and not torch.compiler.is_compiling():
            first, last = self.expert_offsets[0], self.expert_offsets[-1]
            torch._assert_async((first == 0) & (last == pairs),
                                f"RoutingPlan: expert_offsets must run from 0 to T·K = {pairs}; a pair "
                                f"was dropped (an expert id outside [0, E = {self.num_experts})?)")

    def expert_counts(self) -> torch.Tensor:
        """(E,) int64: how many pairs each expert received."""
        return self.expert_offsets[1:] - self.expert_offsets[:-1]
