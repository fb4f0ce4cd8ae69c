"""Router losses against literal transcriptions of DESIGN.md's formulas, and load counting."""
import math

import pytest
import torch

from gmoe import losses


def _poisson_literal(probs, lam):
    lam = min(max(lam, 1.0), 2.0)
    E = probs.shape[1]
    pmf = [lam ** i * math.exp(-lam) / math.factorial(i) for i in range(1, E + 1)]
    q = [v / sum(pmf) for v in pmf]
    per_token = []
    for row in probs.tolist():
        p = sorted(row, reverse=True)
        per_token.append(sum(q[i] * abs(math.log(q[i] / (p[i] + 1e-16))) for i in range(E)))
    return sum(per_token) / len(per_token)


def _normal_literal(load, sigma):
    E = len(load)
    pdf = [math.exp(-0.5 * ((i - E / 2) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi)) for i in range(E)]
    n = sorted([v / sum(pdf) for v in pdf], reverse=True)
    c = sorted(load, reverse=True)
    c = [v / sum(c) for v in c]
    return sum(n[i] * abs(math.log(n[i] / (c[i] + 1e-8))) for i in range(E))


@pytest.mark.parametrize("lam", [0.5, 1.5, 1.9, 3.0], ids=["clamped_low", "init", "inside", "clamped_high"])
def test_poisson_distinction_matches_literal(lam):
    probs = torch.softmax(torch.randn(6, 8), -1)
    got = losses.poisson_distinction_loss(probs, torch.tensor(lam))
    assert got.item() == pytest.approx(_poisson_literal(probs, lam), rel=1e-5)


def test_poisson_rate_learns_inside_clamp_only():
    probs = torch.softmax(torch.randn(6, 8), -1)
    for lam, moves in [(1.5, True), (2.5, False)]:
        rate = torch.tensor(lam, requires_grad=True)
        losses.poisson_distinction_loss(probs, rate).backward()
        assert (rate.grad.abs() > 0).item() == moves


def test_poisson_ignores_padding():
    probs = torch.softmax(torch.randn(6, 8), -1)
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    got = losses.poisson_distinction_loss(probs, torch.tensor(1.5), mask)
    assert got.item() == pytest.approx(_poisson_literal(probs[mask], 1.5), rel=1e-5)


@pytest.mark.parametrize("sigma", [4.0, 1.0])
def test_normal_balance_matches_literal(sigma):
    load = torch.rand(8) * 10
    got = losses.normal_balance_loss(load, torch.tensor(sigma))
    assert got.item() == pytest.approx(_normal_literal(load.tolist(), sigma), rel=1e-5)


def test_normal_std_and_load_get_gradients():
    std = torch.tensor(4.0, requires_grad=True)
    load = (torch.rand(8) * 10).requires_grad_()
    losses.normal_balance_loss(load, std).backward()
    assert std.grad.abs() > 0 and load.grad.abs().sum() > 0


def test_batch_load_counts_topk_probs_of_unpadded_tokens():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    indices = torch.topk(probs, 2).indices
    mask = torch.tensor([True, True, False])
    load = losses.batch_load(probs.gather(1, indices), indices, 3, mask)
    assert torch.allclose(load, torch.tensor([0.6 + 0.2, 0.3, 0.6]))


def test_switch_loss_uniform_routing_is_one():
    E = 4
    probs = torch.full((8, E), 1.0 / E)
    indices = torch.arange(8).remainder(E).unsqueeze(1)
    assert losses.switch_loss(probs, indices).item() == pytest.approx(1.0)
