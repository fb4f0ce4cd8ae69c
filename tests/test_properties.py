"""Property tests (hypothesis): the public routing and expert ops against literal per-expert loops,
on random sizes, tied probabilities and empty experts; bad expert ids; invalid configs.

With tied probabilities two correct top-K implementations may pick different experts, so
routing is checked on what ties leave invariant (the chosen probability values, the weights,
no expert twice); the expert ops are then compared with the oracle on the *same* routing.
Examples stay few and shapes tiny: this file runs in seconds on a shared 2-core machine.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmoe import GMoEConfig
from gmoe_kernels import functional
from gmoe_kernels.activations import act
from gmoe_kernels.naive import expert_ffn_loop
from tests.problems import property_expert_inputs
from tests.tolerances import assert_close

# The autouse seed fixture is function-scoped; every example draws its own seed anyway.
REFERENCE = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
INTERPRETER = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")


@st.composite
def problems(draw, max_tokens=10, max_experts=6, max_width=8):
    """A routing problem: sizes, router probabilities (optionally with exact ties and with
    experts no token can choose) and the routing topk_route makes of them."""
    E = draw(st.integers(1, max_experts))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, max_tokens))
    sizes = dict(T=T, E=E, K=K, R=draw(st.integers(1, 3)), H=draw(st.integers(1, max_width)),
                 F=draw(st.integers(1, max_width + 2)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    if draw(st.booleans()):  # ties: logits from {0, 1} give exactly equal probabilities
        logits = torch.randint(0, 2, (T, E), generator=g).double()
    else:
        logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    # Experts below every other logit are never among a token's top K while K others remain.
    dead = draw(st.sets(st.integers(0, E - 1), max_size=E - K))
    logits[:, sorted(dead)] = -1e4
    return sizes, torch.softmax(logits, dim=-1), sorted(dead), g


def _pairs_of(indices, expert):
    """Pair ids (token·K + slot) routed to `expert`, ascending: what the plan must list."""
    flat = indices.reshape(-1).tolist()
    return [p for p, e in enumerate(flat) if e == expert]


# ----------------------------------------------------------------------------- routing

def _check_topk(probs, indices, weights, K, dead):
    T, E = probs.shape
    assert indices.shape == (T, K) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < E)).all()
    assert all(len(set(row)) == K for row in indices.tolist()), "an expert chosen twice for one token"
    chosen = probs.gather(1, indices)
    # The values are picked from `probs` itself, so they match the K largest exactly, ties or not.
    assert torch.equal(chosen.sort(dim=1, descending=True).values, probs.sort(dim=1, descending=True).values[:, :K])
    assert not any(e in dead for e in indices.reshape(-1).tolist())
    assert_close(weights, chosen / chosen.sum(1, keepdim=True), name="weights")


def _check_plan_dispatch_combine(indices, num_experts, backend, dtype, g):
    T, K = indices.shape
    plan = functional.make_routing_plan(indices, num_experts, backend=backend)
    offsets = plan.expert_offsets.tolist()
    for e in range(num_experts):  # the literal per-expert grouping, empty experts included
        assert plan.sorted_pairs[offsets[e]:offsets[e + 1]].tolist() == _pairs_of(indices, e)
    assert offsets[0] == 0 and offsets[-1] == T * K
    x = torch.randn(T, 5, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(T, K, generator=g, dtype=torch.float64).to(dtype)
    rows = functional.dispatch(x, plan, backend=backend)
    # An MoE with expert e multiplying its rows by (e + 1), through dispatch/combine ...
    expert_of_row = indices.reshape(-1)[plan.sorted_pairs]
    out = functional.combine(rows * (expert_of_row + 1).to(dtype)[:, None], w, plan, backend=backend)
    # ... and as the per-expert loop of the published code computes it.
    expected = torch.zeros(T, 5, dtype=torch.float64)
    for e in range(num_experts):
        tokens, slots = torch.where(indices == e)
        expected.index_add_(0, tokens, w[tokens, slots].double()[:, None] * (e + 1) * x[tokens].double())
    assert_close(out.double(), expected, dtype=dtype, name="combine")


@REFERENCE
@given(problems())
def test_topk_route_and_routing_plan_match_the_loop(problem):
    sizes, probs, dead, g = problem
    indices, weights = functional.topk_route(probs, sizes["K"], backend="reference")
    _check_topk(probs, indices, weights, sizes["K"], dead)
    _check_plan_dispatch_combine(indices, sizes["E"], "reference", torch.float64, g)


@INTERPRETER
@given(problems(max_tokens=6, max_experts=4, max_width=4))
def test_triton_routing_matches_the_loop(problem):
    sizes, probs, dead, g = problem
    probs = probs.float()
    indices, weights = functional.topk_route(probs, sizes["K"], backend="triton")
    _check_topk(probs, indices, weights, sizes["K"], dead)
    _check_plan_dispatch_combine(indices, sizes["E"], "triton", torch.float32, g)


def test_combine_of_zero_tokens():
    indices = torch.zeros(0, 2, dtype=torch.int64)
    plan = functional.make_routing_plan(indices, 3, backend="reference")
    out = functional.combine(torch.zeros(0, 5), torch.zeros(0, 2), plan, backend="reference")
    assert out.shape == (0, 5)


def test_reference_combine_keeps_fp64():
    indices = torch.tensor([[0, 1], [1, 0]])
    plan = functional.make_routing_plan(indices, 2, backend="reference")
    rows = torch.full((4, 1), 1.0 + 2.0 ** -40, dtype=torch.float64)  # fp32 rounds this to 1.0
    out = functional.combine(rows, torch.ones(2, 2, dtype=torch.float64), plan, backend="reference")
    assert out.dtype == torch.float64 and torch.equal(out, 2 * rows[:2])


# ----------------------------------------------------------------------------- expert ops

def _mix_loop(x, gate_base, up_base, a_g, b_g, a_u, b_u, a_d, indices, weights, scaling, activation):
    """expert_mix written per expert: h_c = sum_k w_k h_k and z[t, block e] = sum w_k A_d^e h_k."""
    T, (E, R, _) = x.shape[0], a_g.shape
    h_c = torch.zeros_like(gate_base)
    z = torch.zeros(T, E, R, dtype=x.dtype)
    for e in range(E):
        tokens, slots = torch.where(indices == e)
        rows, w = x[tokens], weights[tokens, slots][:, None].to(x.dtype)
        g = gate_base[tokens] + scaling * rows @ a_g[e].t() @ b_g[e].t()
        u = up_base[tokens] + scaling * rows @ a_u[e].t() @ b_u[e].t()
        h = act(activation, g) * u
        h_c = h_c.index_add(0, tokens, w * h)
        z = z.index_put((tokens, torch.full_like(tokens, e)), w * (h @ a_d[e].t()), accumulate=True)
    return h_c, z.reshape(T, E * R)


def _check_expert_ops(problem, activation, backend, dtype):
    sizes, probs, _, g = problem
    indices, weights = functional.topk_route(probs.to(dtype), sizes["K"], backend=backend)
    weights = weights.to(dtype).detach().requires_grad_()
    x, frozen, lora = property_expert_inputs(sizes, g, dtype)
    inputs, scaling = [x, weights, *lora], 0.75
    y = functional.expert_ffn(x, *frozen, *lora, indices, weights, scaling, activation, backend=backend)
    y_loop = expert_ffn_loop(x, *frozen, *lora, indices, weights, scaling, activation)
    assert_close(y, y_loop, name="y")
    if sizes["T"] > 0:
        dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad(y, inputs, dy)
        grads_loop = torch.autograd.grad(y_loop, inputs, dy, allow_unused=True)
        for name, a, b in zip(["x", "weights", "a_g", "b_g", "a_u", "b_u", "a_d", "b_d"], grads, grads_loop):
            assert_close(a, torch.zeros_like(a) if b is None else b, name=f"d{name}")  # None: nobody chose it
    gate_base, up_base = x @ frozen[0].t(), x @ frozen[1].t()
    mix_args = (x, gate_base, up_base, *lora[:5], indices, weights, scaling, activation)
    for got, want, name in zip(functional.expert_mix(*mix_args, backend=backend), _mix_loop(*mix_args),
                               ("h_c", "z")):
        assert_close(got, want, name=name)


@REFERENCE
@given(problems(), st.sampled_from(ACTIVATIONS))
def test_expert_ffn_and_mix_match_the_loop(problem, activation):
    _check_expert_ops(problem, activation, "reference", torch.float64)


@INTERPRETER
@given(problems(max_tokens=5, max_experts=3, max_width=4), st.sampled_from(ACTIVATIONS))
def test_triton_expert_ffn_and_mix_match_the_loop(problem, activation):
    _check_expert_ops(problem, activation, "triton", torch.float32)


# ----------------------------------------------------------------------------- bad expert ids

@st.composite
def bad_routings(draw):
    """A valid routing with one expert id replaced by one outside [0, E)."""
    E, T = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    K = draw(st.integers(1, E))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    indices = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].contiguous()
    bad = draw(st.one_of(st.integers(E, E + 1000), st.integers(-1000, -1), st.just(2 ** 62)))
    indices[draw(st.integers(0, T - 1)), draw(st.integers(0, K - 1))] = bad
    return E, indices, bad


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_routings(), st.sampled_from(["reference", "triton"]))
def test_expert_ids_out_of_range_are_refused(routing, backend):
    E, indices, bad = routing
    T, K = indices.shape
    H, F, R = 3, 4, 2
    x = torch.randn(T, H)
    lora = [torch.randn(E, R, H), torch.randn(E, F, R), torch.randn(E, R, H), torch.randn(E, F, R),
            torch.randn(E, R, F), torch.randn(E, H, R)]
    weights = torch.full((T, K), 1.0 / K)
    pattern = rf"every id must be in \[0, E = {E}\)"
    with pytest.raises(ValueError, match=pattern):
        functional.expert_ffn(x, torch.randn(F, H), torch.randn(F, H), torch.randn(H, F), *lora,
                              indices, weights, 0.5, "silu", backend=backend)
    with pytest.raises(ValueError, match=pattern):
        functional.expert_mix(x, torch.randn(T, F), torch.randn(T, F), *lora[:5], indices, weights, 0.5, "silu",
                              backend=backend)


def test_routing_plan_refuses_expert_ids_out_of_range():
    for backend in ("reference", "triton"):
        for bad in (3, -1):
            indices = torch.tensor([[0, 1], [2, bad]])
            with pytest.raises(ValueError, match=r"every id must be in \[0, E = 3\)"):
                functional.make_routing_plan(indices, 3, backend=backend)


# ----------------------------------------------------------------------------- configs

INT_FIELDS = {"num_experts": (1, 256), "top_k": (1, None), "r": (1, None), "gcn_layers": (1, 8), "gcn_dim": (1, None)}
NUMBER_FIELDS = {"lora_alpha": (0.0, None, True), "lora_dropout": (0.0, 1.0, False),
                 "edge_density": (0.0, 1.0, False), "poisson_loss_coef": (0.0, None, False),
                 "normal_loss_coef": (0.0, None, False), "aux_loss_coef": (0.0, None, False),
                 "token_init_gain": (0.0, None, True)}
CHOICE_FIELDS = {"router": ("graph", "linear"), "backend": ("auto", "reference", "triton")}
LIST_FIELDS = ("target_modules", "expert_modules")
OTHER_TYPES = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1), st.complex_numbers())


def _bad_int(low, high):
    outside = st.integers(max_value=low - 1)
    if high is not None:
        outside = st.one_of(outside, st.integers(min_value=high + 1))
    return st.one_of(outside, st.floats(allow_nan=True), OTHER_TYPES)


def _bad_number(low, high, low_open):
    below = st.floats(max_value=low, exclude_max=not low_open) | st.integers(max_value=math.floor(low) - 1)
    outside = below | st.just(float("nan")) | st.just(float("inf")) | st.just(float("-inf"))
    if high is not None:
        outside = outside | st.floats(min_value=high, exclude_min=True, allow_infinity=False) | \
            st.integers(min_value=math.floor(high) + 1)
    if high is None:  # an int too large for a float is not a finite number either
        outside = outside | st.integers(min_value=10 ** 309, max_value=10 ** 400)
    return outside | OTHER_TYPES


def invalid_fields():
    cases = [st.tuples(st.just(n), _bad_int(*b)) for n, b in INT_FIELDS.items()]
    cases += [st.tuples(st.just(n), _bad_number(*b)) for n, b in NUMBER_FIELDS.items()]
    cases += [st.tuples(st.just(n), st.one_of(st.text(max_size=8).filter(lambda v, c=c: v not in c), OTHER_TYPES
                                              .filter(lambda v: not isinstance(v, str))))
              for n, c in CHOICE_FIELDS.items()]
    cases += [st.tuples(st.just(n), st.one_of(
        st.none(), st.text(max_size=6), st.integers(), st.lists(st.one_of(st.integers(), st.none()), min_size=1,
                                                                max_size=3)))
        for n in LIST_FIELDS]
    cases.append(st.tuples(st.just("expert_modules"), st.lists(
        st.text(max_size=6).filter(lambda v: v not in ("gate_proj", "up_proj", "down_proj")), min_size=1, max_size=2)))
    cases.append(st.tuples(st.just("expert_modules"), st.just([])))
    cases.append(st.tuples(st.just("target_modules"), st.sampled_from([["gate_proj"], ["q_proj", "down_proj"]])))
    cases.append(st.tuples(st.just("base_model_name_or_path"), st.one_of(st.integers(), st.booleans(),
                                                                         st.lists(st.text(), max_size=1))))
    return st.one_of(cases)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(invalid_fields())
def test_invalid_config_values_raise_value_error_naming_the_field(case):
    name, value = case
    with pytest.raises(ValueError, match=rf"GMoEConfig\.{name}="):
        GMoEConfig(**{name: value})


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 256), st.data())
def test_top_k_above_num_experts_names_top_k(num_experts, data):
    top_k = data.draw(st.integers(num_experts + 1, num_experts + 300))
    with pytest.raises(ValueError, match=rf"GMoEConfig\.top_k={top_k}.*num_experts \({num_experts}\)"):
        GMoEConfig(num_experts=num_experts, top_k=top_k)
