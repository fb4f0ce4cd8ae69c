"""Bitwise reproducibility of the Triton backend, whatever order its programs run in.

On a GPU, programs run in no fixed order; a reduction that depends on that order (an
atomic add of floats) changes the last bits from run to run. The interpreter runs programs
in grid order, so each test runs an op twice, once with the grid walked backwards (the
interpreter's `range` shadowed for its grid loop only), and asserts the same bits for every
output and gradient. An order-dependent float reduction fails this: the negative test shows
that it does, with a deliberately atomic kernel.
"""
import builtins
import contextlib
import sys

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from gmoe_kernels import functional
from gmoe_kernels.triton import expert_mix_configs
from gmoe_kernels.triton._common import launch


@contextlib.contextmanager
def programs_in_reverse():
    """Run every Triton grid in reverse program order (interpreter only)."""
    def grid_range(*args):
        order = builtins.range(*args)
        return reversed(order) if sys._getframe(1).f_code.co_name == "__call__" else order
    interpreter.range = grid_range
    try:
        yield
    finally:
        del interpreter.range


def _run_twice(fn):
    torch.use_deterministic_algorithms(True)
    try:
        first = fn()
        with programs_in_reverse():
            second = fn()
    finally:
        torch.use_deterministic_algorithms(False)
    return first, second


def _assert_same_bits(first, second):
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                           b.view(torch.uint8) if b.is_floating_point() else b), \
            f"output {i} differs between program orders: max |diff| {(a - b).abs().max()}"


def _skewed_indices(num_tokens, num_experts, top_k, generator):
    """Most tokens pick expert 0 first (one hot expert); the last expert stays empty."""
    scores = torch.rand(num_tokens, num_experts - 1, generator=generator)
    scores[:, 0] += 2.0 * (torch.rand(num_tokens, generator=generator) < 0.8)
    return scores.topk(top_k, dim=1).indices


@pytest.mark.parametrize("mode, dtype", [("gather", torch.float32), ("gather", torch.float16),
                                         ("dot", torch.float16)])   # dot takes 16-bit data only
def test_expert_mix_is_bitwise_reproducible(mode, dtype, monkeypatch):
    monkeypatch.setenv("GMOE_EXPAND", mode)
    monkeypatch.setenv("GMOE_POISON", "1")
    g = torch.Generator().manual_seed(3)
    T, H, F, E, K, R = 40, 16, 96, 5, 2, 4
    x = torch.randn(T, H, generator=g).to(dtype)
    gate, up = (torch.randn(T, F, generator=g).to(dtype) for _ in range(2))
    lora = [(torch.randn(*shape, generator=g) * 0.3).to(dtype) for shape in
            ((E, R, H), (E, F, R), (E, R, H), (E, F, R), (E, R, F))]
    indices = _skewed_indices(T, E, K, g)
    weights = torch.softmax(torch.randn(T, K, generator=g), -1)
    grad_h, grad_z = (torch.randn(T, n, generator=g).to(dtype) for n in (F, E * R))
    assert expert_mix_configs.expand_mode(E, R, (dtype,) * 4, K, H) == mode

    def step():
        inputs = [t.clone().requires_grad_() for t in (x, gate, up, *lora)]
        w = weights.clone().requires_grad_()
        h_c, z = functional.expert_mix(*inputs, indices, w, 2.0, "silu", backend="triton")
        torch.autograd.backward((h_c, z), (grad_h, grad_z))
        return [h_c.detach(), z.detach()] + [t.grad for t in inputs] + [w.grad]

    _assert_same_bits(*_run_twice(step))


def test_dispatch_combine_is_bitwise_reproducible():
    g = torch.Generator().manual_seed(4)
    T, H, E, K = 33, 40, 4, 2
    indices = _skewed_indices(T, E, K, g)
    x = torch.randn(T, H, generator=g)
    weights = torch.softmax(torch.randn(T, K, generator=g), -1)

    def step():
        xi, w = x.clone().requires_grad_(), weights.clone().requires_grad_()
        plan = functional.make_routing_plan(indices, E, backend="triton")
        out = functional.combine(functional.dispatch(xi, plan, backend="triton") * 1.5, w, plan,
                                 backend="triton")
        out.backward(torch.ones_like(out))
        return [plan.sorted_pairs, plan.inverse, out.detach(), xi.grad, w.grad]

    _assert_same_bits(*_run_twice(step))


@triton.jit
def _atomic_sum_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(out_ptr, tl.sum(tl.load(x_ptr + offs), axis=0), sem="relaxed")


def test_reverse_order_exposes_an_order_dependent_reduction():
    """The check can fail: float atomics summed in another order give other bits."""
    values = torch.tensor([1e8, 1.0, -1e8, 1.0] * 8, dtype=torch.float32)

    def step():
        out = torch.zeros(1)
        _atomic_sum_kernel[(values.numel(),)](values, out, BLOCK=1)
        return [out]

    first, second = _run_twice(step)
    assert not torch.equal(first[0], second[0])


def test_graph_router_is_bitwise_reproducible():
    g = torch.Generator().manual_seed(5)
    T, H, E, G, L, K = 19, 24, 6, 20, 2, 2
    x = torch.randn(T, H, generator=g)
    params = [torch.randn(G, H, generator=g) * 0.3, torch.randn(G, H, generator=g) * 0.3,
              torch.randn(E, H, generator=g), None, torch.randn(L, G, G, generator=g) * 0.3,
              torch.randn(G, generator=g)]
    adjacency = torch.ones(E, E) - torch.eye(E)
    params[3] = functional.normalized_adjacency(adjacency)

    def step():
        xi = x.clone().requires_grad_()
        leaves = [p if i == 3 else p.clone().requires_grad_() for i, p in enumerate(params)]
        logits, probs, _, weights = functional.graph_router(xi, *leaves, K, "silu",
                                                            backend="triton")
        (logits.square().sum() + probs[:, 0].sum() + weights.sum()).backward()
        return [logits.detach(), probs.detach(), xi.grad] + [
            p.grad for i, p in enumerate(leaves) if i != 3]

    _assert_same_bits(*_run_twice(step))


@triton.jit
def _block_size_kernel(out_ptr, n, BLOCK: tl.constexpr):
    tl.store(out_ptr, BLOCK)


def test_deterministic_mode_takes_the_first_pruned_config_without_timing():
    """Configs tile differently, so sum in another order: under deterministic algorithms the
    launcher uses the first config the pruning keeps (here BLOCK 8), never a timed choice
    (timing would also fail here: the interpreter cannot benchmark two configs)."""
    out = torch.zeros(1, dtype=torch.int32)
    pruned = [triton.Config({"BLOCK": 8}), triton.Config({"BLOCK": 4})]
    torch.use_deterministic_algorithms(True)
    try:
        launch(_block_size_kernel, (1,), pruned, key=("n",), out_ptr=out, n=5)
    finally:
        torch.use_deterministic_algorithms(False)
    assert out.item() == 8
