"""The router losses of GMoE (DESIGN.md, "Losses") and the Switch loss of the linear baseline.

All in fp32. `mask` (T,) bool marks non-padding tokens; losses and load ignore the rest.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

POISSON_RATE_RANGE = (1.0, 2.0)


def poisson_target(num_experts: int, rate: torch.Tensor) -> torch.Tensor:
    """q_i ∝ Poisson(i; λ) for i = 1..E, L1-normalised; λ clamped to [1, 2]. Returns (E,) fp32."""
    lam = rate.float().clamp(*POISSON_RATE_RANGE)
    i = torch.arange(1, num_experts + 1, dtype=torch.float32, device=rate.device)
    log_pmf = i * torch.log(lam) - lam - torch.lgamma(i + 1)
    return torch.softmax(log_pmf, dim=0)  # = pmf / sum(pmf), computed stably


def poisson_distinction_loss(probs: torch.Tensor, rate: torch.Tensor, mask: torch.Tensor | None = None):
    """D = mean over tokens of sum_i q_i |log(q_i / (p↓_i + 1e-16))|, p↓ each token's sorted probs."""
    probs = probs.float()
    if mask is not None:
        probs = probs[mask]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    q = poisson_target(probs.shape[1], rate)
    p_sorted = torch.sort(probs, dim=1, descending=True).values
    return (q * torch.log(q / (p_sorted + 1e-16)).abs()).sum(dim=1).mean()


def normal_target(num_experts: int, std: torch.Tensor) -> torch.Tensor:
    """n_i ∝ Normal(i; μ = E/2, σ) for i = 0..E-1, L1-normalised, sorted descending. (E,) fp32."""
    sigma = std.float().abs() + 1e-6
    i = torch.arange(num_experts, dtype=torch.float32, device=std.device)
    log_pdf = -0.5 * ((i - num_experts / 2) / sigma) ** 2  # the 1/(σ√2π) factor cancels
    return torch.sort(torch.softmax(log_pdf, dim=0), descending=True).values


def batch_load(probs_topk: torch.Tensor, indices: torch.Tensor, num_experts: int,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) fp32: this batch's top-K probabilities summed per expert over non-padding tokens."""
    p = probs_topk.float()
    if mask is not None:
        p = p * mask.to(p.dtype).unsqueeze(1)
    load = torch.zeros(num_experts, dtype=torch.float32, device=p.device)
    return load.index_add(0, indices.reshape(-1), p.reshape(-1))


def global_load(local: torch.Tensor) -> torch.Tensor:
    """Sum the batch load over data-parallel ranks, keeping the gradient of this rank's part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total)
    return local + (total - local.detach())


def normal_balance_loss(load_now: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """B = sum_i n_i |log(n_i / (ĉ_i + 1e-8))|, ĉ = sort↓(load) / sum(load)."""
    n = normal_target(load_now.shape[0], std)
    c = torch.sort(load_now.float(), descending=True).values
    c_hat = c / c.sum().clamp_min(1e-12)
    return (n * torch.log(n / (c_hat + 1e-8)).abs()).sum()


def switch_loss(probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None):
    """Switch/Mixtral load balancing: E · sum_e f_e · P_e (f_e: fraction of routed slots, P_e: mean prob)."""
    probs = probs.float()
    if mask is not None:
        probs, indices = probs[mask], indices[mask]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    num_experts = probs.shape[1]
    routed = torch.zeros(num_experts, device=probs.device).index_add(
        0, indices.reshape(-1), torch.ones(indices.numel(), device=probs.device))
    return num_experts * ((routed / indices.numel()) * probs.mean(0)).sum()
