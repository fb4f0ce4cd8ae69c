"""The router losses of GMoE (DESIGN.md, "Losses") and the Switch loss of the linear baseline.

All in fp32. `mask` (T,) bool marks non-padding tokens; losses and load ignore the rest.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

POISSON_RATE_RANGE = (1.0, 2.0)


def poisson_log_target(num_experts: int, rate: torch.Tensor) -> torch.Tensor:
    """log q_i, q_i ∝ Poisson(i; λ) for i = 1..E, L1-normalised; λ clamped to [1, 2]. (E,) fp32.

    In log space: at E ≳ 40 the smallest q_i underflow fp32 (Poisson(64; 2) ≈ e^-166), and the
    loss's q_i · log q_i would be 0 · (-inf) = NaN.
    """
    lam = rate.float().clamp(*POISSON_RATE_RANGE)
    i = torch.arange(1, num_experts + 1, dtype=torch.float32, device=rate.device)
    log_pmf = i * torch.log(lam) - lam - torch.lgamma(i + 1)
    return torch.log_softmax(log_pmf.reshape(-1), dim=0)  # = log(pmf / sum(pmf)), computed stably


def poisson_target(num_experts: int, rate: torch.Tensor) -> torch.Tensor:
    """q (E,) fp32: the probabilities of `poisson_log_target`."""
    return poisson_log_target(num_experts, rate).exp()


def poisson_distinction_sum(probs: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor | None = None):
    """Sum over non-padding tokens of sum_i q_i |log(q_i / (p↓_i + 1e-16))|, p↓ each token's sorted probs.

    log_q: (E,) the log Poisson target (`poisson_log_target`). A sum, not a mean, so that data-parallel
    ranks can add their parts before dividing by the global token count. Returns () fp32.
    """
    p_sorted = torch.sort(probs.float(), dim=1, descending=True).values
    per_token = (log_q.exp() * (log_q - torch.log(p_sorted + 1e-16)).abs()).sum(dim=1)
    return per_token.sum() if mask is None else (per_token * mask.to(per_token.dtype)).sum()


def poisson_distinction_loss(probs: torch.Tensor, rate: torch.Tensor, mask: torch.Tensor | None = None):
    """D = mean over non-padding tokens of the per-token Poisson distinction (0 for no tokens)."""
    log_q = poisson_log_target(probs.shape[1], rate)
    return poisson_distinction_sum(probs, log_q, mask) / token_count(probs, mask).clamp_min(1.0)


def token_count(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """() fp32: the number of non-padding tokens."""
    if mask is None:
        return torch.tensor(float(probs.shape[0]), device=probs.device)
    return mask.float().sum()


def normal_std_range(num_experts: int) -> tuple[float, float]:
    """The range σ is clamped to inside the Normal loss: [max(1, E/8), 2E].

    Below about E/16 the sorted target puts nearly all its mass on one expert, so a collapsed load
    scores better than a uniform one (at E 8 from σ ≈ 0.43 down, at E 64 from σ ≈ 2.2), and the
    learnable σ would have a downhill path towards collapse; E/8 (1 for E ≤ 8: at E 2 the crossing is
    at σ ≈ 0.45) keeps a margin. Above 2E the target is flat to within 1 % and σ no longer changes
    anything. The init, E/2, is inside.
    """
    return max(1.0, num_experts / 8.0), 2.0 * num_experts


def normal_log_target(num_experts: int, std: torch.Tensor) -> torch.Tensor:
    """log n_i, n_i ∝ Normal(i; μ = E/2, σ) for i = 0..E-1, L1-normalised, sorted descending. (E,) fp32.

    σ is clamped to `normal_std_range(E)` (no gradient outside it, as for λ). In log space: the
    tails underflow fp32 at small σ (n_i = 0 at σ 0.2, E 8), and n_i · log n_i would be NaN.
    """
    sigma = std.float().reshape(-1).clamp(*normal_std_range(num_experts))
    i = torch.arange(num_experts, dtype=torch.float32, device=std.device)
    log_pdf = -0.5 * ((i - num_experts / 2) / sigma) ** 2  # the 1/(σ√2π) factor cancels
    return torch.sort(torch.log_softmax(log_pdf, dim=0), descending=True).values


def normal_target(num_experts: int, std: torch.Tensor) -> torch.Tensor:
    """n (E,) fp32: the probabilities of `normal_log_target`."""
    return normal_log_target(num_experts, std).exp()


def batch_load(probs_topk: torch.Tensor, indices: torch.Tensor, num_experts: int,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) fp32: this batch's top-K probabilities summed per expert over non-padding tokens."""
    p = probs_topk.float()
    if mask is not None:
        p = p * mask.to(p.dtype).unsqueeze(1)
    load = torch.zeros(num_experts, dtype=torch.float32, device=p.device)
    return load.index_add(0, indices.reshape(-1), p.reshape(-1))


def global_sums(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor of `parts` over data-parallel ranks, in one all-reduce.

    Value: the global sum, the same on every rank. Gradient: world_size × this rank's part.
    A loss that is a nonlinear function of batch-global statistics (the Normal loss of the
    global load, the Switch loss, a mean over the global token count) can differentiate only
    this rank's share; the engine (DDP, FSDP, DeepSpeed, Accelerate) then averages gradients
    over ranks, so the share's gradient is weighted by world_size to give exactly what one
    process computes on the concatenated batch (DESIGN.md, "Data parallelism").
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return parts
    names = list(parts)
    flat = torch.cat([parts[n].float().reshape(-1) for n in names])
    total = flat.detach().clone()
    dist.all_reduce(total)
    summed = total + dist.get_world_size() * (flat - flat.detach())
    pieces = summed.split([parts[n].numel() for n in names])
    return {n: piece.view(parts[n].shape) for n, piece in zip(names, pieces)}


def normal_balance_loss(load_now: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """B = sum_i n_i |log(n_i / (ĉ_i + 1e-8))|, ĉ = sort↓(load) / sum(load)."""
    return normal_balance(load_now, normal_log_target(load_now.shape[0], std))


def normal_balance(load_now: torch.Tensor, log_n: torch.Tensor) -> torch.Tensor:
    """The Normal balance loss against a given log target log_n (E,) (`normal_log_target`)."""
    c = torch.sort(load_now.float(), descending=True).values
    c_hat = c / c.sum().clamp_min(1e-12)
    return (log_n.exp() * (log_n - torch.log(c_hat + 1e-8)).abs()).sum()


def switch_stats(probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None):
    """(2, E) fp32 sums over non-padding tokens: row 0 the routed slots per expert, row 1 the probabilities."""
    probs = probs.float()
    keep = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.float()
    routed = torch.zeros(probs.shape[1], device=probs.device).index_add(
        0, indices.reshape(-1), keep.repeat_interleave(indices.shape[1]))
    return torch.stack([routed, (probs * keep.unsqueeze(1)).sum(0)])


def switch_loss_from_stats(stats: torch.Tensor, tokens: torch.Tensor, top_k: int) -> torch.Tensor:
    """E · sum_e f_e · P_e with f_e = routed_e / (tokens · K) and P_e = prob_sum_e / tokens (0 for no tokens)."""
    tokens = tokens.clamp_min(1.0)
    return stats.shape[1] * ((stats[0] / (tokens * top_k)) * (stats[1] / tokens)).sum()


def switch_loss(probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None):
    """Switch/Mixtral load balancing: E · sum_e f_e · P_e (f_e: fraction of routed slots, P_e: mean prob)."""
    return switch_loss_from_stats(switch_stats(probs, indices, mask), token_count(probs, mask), indices.shape[1])
