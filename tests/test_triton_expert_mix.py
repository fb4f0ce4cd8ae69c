"""Triton expert mix (gmoe_kernels.triton.expert_mix) under the interpreter.

Compared against the reference twin (gmoe_kernels.reference.expert_mix) and against the
per-expert oracle (expert_ffn_loop, through functional.expert_ffn), outputs and the
gradient of every input, fp32 and fp16, for every token-kernel variant (gather, one-hot
tl.dot, expert-grouped; on a GPU dot and grouped take 16-bit data only, while under the
interpreter a forced variant runs in fp32 and fp64 too, so the gradchecks cover it). GMOE_POISON=1 is set for every test, so every output the kernels must write starts
as NaN and an unwritten element fails.
"""
import dataclasses
import importlib

import pytest
import torch

from gmoe_kernels import functional, reference
from gmoe_kernels.naive import expert_ffn_loop
from gmoe_kernels.triton import expert_mix_configs
from tests.problems import case_ffn, case_mix_inputs, case_routing
from tests.tolerances import assert_close

# the module, not the function `gmoe_kernels.triton.expert_mix` the package exports
triton_expert_mix = importlib.import_module("gmoe_kernels.triton.expert_mix")

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True, params=["gather", "dot", "grouped"])
def _poison(request, monkeypatch):
    """Every test runs once per token-kernel variant (GMOE_EXPAND), outputs poisoned."""
    monkeypatch.setenv("GMOE_POISON", "1")
    monkeypatch.setenv("GMOE_EXPAND", request.param)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    T: int = 24
    H: int = 32
    F: int = 48
    E: int = 4
    K: int = 2
    R: int = 8
    routing: str = "random"   # random | empty_expert | one_expert
    activation: str = "silu"
    scaling: float = 2.0


CASES = [
    Case("base"),
    Case("T1", T=1),
    Case("empty_expert", E=5, routing="empty_expert"),
    Case("all_tokens_one_expert", K=1, routing="one_expert"),
    Case("K1", K=1),
    Case("K_eq_E", K=4),
    Case("R1", R=1),
    Case("R20_padded_to_32", R=20, T=12),
    Case("odd_H25_F43_T37", T=37, H=25, F=43),
    Case("multi_tile_T40_F96", T=40, F=96, E=6, K=3),
    Case("E16", E=16, K=3, T=20),
    Case("gelu_tanh", activation="gelu_tanh"),
    Case("gelu_tanh_odd_H25_F43", T=19, H=25, F=43, activation="gelu_tanh"),
]


MIX_NAMES = ["x", "gate_base", "up_base", "lora_a_gate", "lora_b_gate", "lora_a_up",
             "lora_b_up", "lora_a_down"]


def run_mix(impl, tensors, indices, weights, case, grad_h_c, grad_z):
    """Forward + backward of `impl.expert_mix`; returns outputs then every gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    w = weights.detach().clone().requires_grad_()
    h_c, z = impl.expert_mix(*leaves, indices, w, case.scaling, case.activation)
    loss = (h_c.float() * grad_h_c).sum() + (z.float() * grad_z).sum()
    grads = torch.autograd.grad(loss, leaves + [w])
    return [h_c, z, *grads]


def ids(cases):
    return [c.name for c in cases]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_expert_mix_matches_reference(case, dtype):
    tensors = case_mix_inputs(case, dtype)
    indices, weights = case_routing(case)
    grad_h_c = torch.randn(case.T, case.F)
    grad_z = torch.randn(case.T, case.E * case.R)
    got = run_mix(triton_expert_mix, tensors, indices, weights, case, grad_h_c, grad_z)
    want = run_mix(reference, tensors, indices, weights, case, grad_h_c, grad_z)
    names = ["h_c", "z"] + [f"d_{n}" for n in MIX_NAMES] + ["d_weights"]
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: non-finite (unwritten?) elements"
        assert_close(a, b, dtype, name)


FFN_NAMES = ["x", "gate_weight", "up_weight", "down_weight", "lora_a_gate", "lora_b_gate",
             "lora_a_up", "lora_b_up", "lora_a_down", "lora_b_down"]


def run_ffn(fn, params, indices, weights, case, grad_y, **kwargs):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    w = weights.detach().clone().requires_grad_()
    y = fn(*(leaves[n] for n in FFN_NAMES), indices, w.to(params["x"].dtype)
           if fn is expert_ffn_loop else w, case.scaling, case.activation, **kwargs)
    grads = torch.autograd.grad((y.float() * grad_y).sum(), [leaves[n] for n in FFN_NAMES] + [w])
    return [y, *grads]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_expert_ffn_matches_loop_oracle(case, dtype):
    """functional.expert_ffn(backend="triton") against the per-expert loop (computed in fp32
    from the same rounded inputs), output and every gradient."""
    params = case_ffn(case, dtype)
    indices, weights = case_routing(case)
    grad_y = torch.randn(case.T, case.H)
    got = run_ffn(functional.expert_ffn, params, indices, weights, case, grad_y,
                  backend="triton")
    oracle_params = {k: v.float() for k, v in params.items()}
    want = run_ffn(expert_ffn_loop, oracle_params, indices, weights, case, grad_y)
    for name, a, b in zip(["y"] + [f"d_{n}" for n in FFN_NAMES] + ["d_weights"], got, want):
        assert torch.isfinite(a).all(), f"{name}: non-finite elements"
        assert_close(a.float(), b, dtype, name)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu", "relu"])
def test_every_activation_matches_reference(activation):
    case = Case(f"act_{activation}", T=17, F=40, activation=activation)
    tensors = case_mix_inputs(case, torch.float32)
    indices, weights = case_routing(case)
    grad_h_c, grad_z = torch.randn(case.T, case.F), torch.randn(case.T, case.E * case.R)
    got = run_mix(triton_expert_mix, tensors, indices, weights, case, grad_h_c, grad_z)
    want = run_mix(reference, tensors, indices, weights, case, grad_h_c, grad_z)
    for name, a, b in zip(["h_c", "z"] + MIX_NAMES + ["weights"], got, want):
        assert_close(a, b, torch.float32, name)


def test_activation_alias_accepted():
    case = Case("alias", T=5, F=20)
    tensors = case_mix_inputs(case, torch.float32)
    indices, weights = case_routing(case)
    a = triton_expert_mix.expert_mix(*tensors, indices, weights, 2.0, "swish")
    b = reference.expert_mix(*tensors, indices, weights, 2.0, "silu")
    for x, y in zip(a, b):
        assert_close(x, y, torch.float32)


def test_non_contiguous_inputs():
    """Strided views everywhere (transposed LoRA weights, column slices of G/U, transposed
    indices/weights): the launchers pass strides, never copy."""
    case = Case("noncontig", T=18, H=24, F=40)
    tensors = case_mix_inputs(case, torch.float32)
    indices, weights = case_routing(case)
    x, gate_base, up_base, a_g, b_g, a_u, b_u, a_d = tensors
    wide_g = torch.randn(case.T, 2 * case.F)
    wide_g[:, 1::2] = gate_base
    strided = [x.t().contiguous().t(), wide_g[:, 1::2], up_base.t().contiguous().t(),
               a_g.transpose(1, 2).contiguous().transpose(1, 2),
               b_g.transpose(1, 2).contiguous().transpose(1, 2),
               a_u.transpose(0, 1).contiguous().transpose(0, 1), b_u,
               a_d.transpose(1, 2).contiguous().transpose(1, 2)]
    assert not strided[1].is_contiguous() and not strided[4].is_contiguous()
    idx_t = indices.t().contiguous().t()
    w_t = weights.t().contiguous().t()
    grad_h_c, grad_z = torch.randn(case.T, case.F), torch.randn(case.T, case.E * case.R)
    got = run_mix(triton_expert_mix, strided, idx_t, w_t, case, grad_h_c, grad_z)
    want = run_mix(reference, tensors, indices, weights, case, grad_h_c, grad_z)
    for name, a, b in zip(["h_c", "z"] + MIX_NAMES + ["weights"], got, want):
        assert_close(a, b, torch.float32, name)


def test_only_h_c_used():
    """z unused: its gradient arrives as None/zeros and the backward still runs."""
    case = Case("h_c_only", T=9, F=20)
    tensors = [t.requires_grad_() for t in case_mix_inputs(case, torch.float32)]
    indices, weights = case_routing(case)
    h_c, _ = triton_expert_mix.expert_mix(*tensors, indices, weights, 2.0, "silu")
    got = torch.autograd.grad(h_c.sum(), tensors)
    h_ref, _ = reference.expert_mix(*tensors, indices, weights, 2.0, "silu")
    want = torch.autograd.grad(h_ref.sum(), tensors)
    for name, a, b in zip(MIX_NAMES, got, want):
        assert_close(a, b, torch.float32, name)


def test_op_autograd_matches_the_launchers():
    """The registered op (forward, setup_context, backward op) gives bitwise what the two
    launchers return when called directly with the same cotangents."""
    case = Case("function", T=10, F=24)
    tensors = case_mix_inputs(case, torch.float32)
    indices, weights = case_routing(case)
    grad_h_c, grad_z = torch.randn(case.T, case.F), torch.randn(case.T, case.E * case.R)
    got = run_mix(triton_expert_mix, tensors, indices, weights, case, grad_h_c, grad_z)
    settings = (indices, weights, case.scaling, case.activation)
    outputs = triton_expert_mix.expert_mix_forward(*tensors, *settings)
    grads = triton_expert_mix.expert_mix_backward(grad_h_c, grad_z, *tensors, *settings)
    want = [*outputs, *grads]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gradcheck_fp64(activation):
    """float64 gradcheck (fast_mode) of the custom op: the kernels run in fp64 under the
    interpreter (ACC_FP64), so the analytic backward is checked to fp64 precision."""
    case = Case("gradcheck", T=5, H=6, F=18, E=3, K=2, R=2, activation=activation)
    tensors = [t.double().requires_grad_() for t in case_mix_inputs(case, torch.float64)]
    indices, weights = case_routing(case)
    weights = weights.double().requires_grad_()

    def fn(*args):
        return triton_expert_mix.expert_mix(*args[:8], indices, args[8], 0.75, activation)

    assert torch.autograd.gradcheck(fn, (*tensors, weights), fast_mode=True)


def test_opcheck_custom_ops():
    """torch.library.opcheck of both custom ops (schema, fake tensor, autograd registration,
    aot dispatch), no torch.compile."""
    case = Case("opcheck", T=6, H=16, F=20, E=3, K=2, R=4)
    tensors = [t.requires_grad_() for t in case_mix_inputs(case, torch.float32)]
    indices, weights = case_routing(case)
    weights.requires_grad_()
    args = (*tensors, indices, weights, 2.0, "silu")
    torch.library.opcheck(torch.ops.gmoe_kernels.expert_mix.default, args)
    grads = (torch.randn(case.T, case.F), torch.randn(case.T, case.E * case.R))
    bargs = (*grads, *(t.detach() for t in tensors), indices, weights.detach(), 2.0, "silu")
    torch.library.opcheck(torch.ops.gmoe_kernels.expert_mix_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_poisoning_is_active():
    from gmoe_kernels.triton._common import new_output

    assert torch.isnan(new_output((3, 4), torch.float16, "cpu")).all()
    assert (new_output((5,), torch.int64, "cpu") == -1).all()


def test_shape_errors():
    case = Case("errors", T=4, F=20)
    tensors = case_mix_inputs(case, torch.float32)
    indices, weights = case_routing(case)
    with pytest.raises(ValueError, match="lora_b_gate"):
        triton_expert_mix.expert_mix(*tensors[:4], tensors[4][:, :-1], *tensors[5:], indices,
                                     weights, 2.0, "silu")
    with pytest.raises(TypeError, match="int64"):
        triton_expert_mix.expert_mix(*tensors, indices.int(), weights, 2.0, "silu")
    with pytest.raises(ValueError, match="not supported"):
        triton_expert_mix.expert_mix(*tensors, indices, weights, 2.0, "tanh")


def test_expand_mode_choice(monkeypatch):
    """The documented rule: least estimated cost among the eligible variants (bf16 data)."""
    monkeypatch.delenv("GMOE_EXPAND")
    mode = expert_mix_configs.expand_mode
    assert mode(8, 16, top_k=2, hidden=4096) == "dot"          # K·E·R/H = 6 %
    assert mode(64, 64, top_k=8, hidden=4096) == "grouped"     # E·R = 4096: no dot
    assert mode(32, 16, top_k=8, hidden=4096) == "grouped"     # dot 100 % > grouped 78 %
    assert mode(8, 6, top_k=2, hidden=4096) == "grouped"       # R not a power of two: no dot
    monkeypatch.setenv("GMOE_EXPAND", "fused")
    with pytest.raises(ValueError, match="GMOE_EXPAND"):
        mode(8, 16)


def test_dot_is_not_chosen_where_no_config_fits(monkeypatch):
    """R 32 needs 32-column chunks (the interpreter's has 16): dot must not be picked, forced
    or not, and the op must run (it raised a shape error in the fold before)."""
    half = (torch.float16,) * 4
    monkeypatch.setenv("GMOE_EXPAND", "dot")
    assert expert_mix_configs.expand_mode(2, 32, half, top_k=2, hidden=16) == "gather"
    monkeypatch.delenv("GMOE_EXPAND")
    assert expert_mix_configs.expand_mode(2, 32, half, top_k=2, hidden=16) != "dot"
    monkeypatch.setenv("GMOE_EXPAND", "dot")
    T, H, F, E, K, R = 8, 16, 32, 2, 2, 32
    x = torch.randn(T, H, dtype=torch.float16)
    lora = [torch.randn(*s, dtype=torch.float16) * 0.1
            for s in [(E, R, H), (E, F, R), (E, R, H), (E, F, R), (E, R, F)]]
    base = [torch.randn(T, F, dtype=torch.float16) for _ in range(2)]
    indices = torch.tensor([[0, 1]] * T)
    weights = torch.full((T, K), 0.5)
    args = (x, *base, *lora, indices, weights, 2.0, "silu")
    for a, b in zip(functional.expert_mix(*args, backend="triton"),
                    functional.expert_mix(*args, backend="reference")):
        assert_close(a, b, name="out")


def test_grouped_is_never_chosen_under_deterministic_algorithms(monkeypatch):
    """Its slot sums are atomics: deterministic mode falls back to a variant without them."""
    mode = expert_mix_configs.expand_mode
    monkeypatch.delenv("GMOE_EXPAND")
    torch.use_deterministic_algorithms(True)
    try:
        assert mode(64, 64, top_k=8, hidden=4096) == "gather"
        monkeypatch.setenv("GMOE_EXPAND", "grouped")
        assert mode(64, 64, top_k=8, hidden=4096) == "gather"
    finally:
        torch.use_deterministic_algorithms(False)
    assert mode(64, 64, top_k=8, hidden=4096) == "grouped"


def test_repeated_expert_in_one_token_matches_reference():
    torch.manual_seed(5)
    T, H, F, E, K, R = 8, 16, 24, 4, 2, 2
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    gate_base, up_base = torch.randn(T, F, dtype=torch.float64), torch.randn(T, F, dtype=torch.float64)
    lora = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
            for s in [(E, R, H), (E, F, R), (E, R, H), (E, F, R), (E, R, F)]]
    indices = torch.randint(0, E, (T, 1)).repeat(1, K)
    weights = torch.rand(T, K, dtype=torch.float64)
    args = (x, gate_base, up_base, *lora, indices, weights, 0.5, "silu")
    for a, b in zip(functional.expert_mix(*args, backend="triton"), functional.expert_mix(*args, backend="reference")):
        assert_close(a, b, name="out")
    got = torch.autograd.grad(sum(o.sum() for o in functional.expert_mix(*args, backend="triton")), [x, *lora])
    want = torch.autograd.grad(sum(o.sum() for o in functional.expert_mix(*args, backend="reference")), [x, *lora])
    for a, b in zip(got, want):
        assert_close(a, b, name="grad")


def test_auto_mode_uses_tensor_core_variants_only_for_matching_half_dtypes(monkeypatch):
    monkeypatch.delenv("GMOE_EXPAND")
    bf16, fp32 = torch.bfloat16, torch.float32
    assert expert_mix_configs.expand_mode(8, 16, (bf16, bf16, bf16, bf16)) == "dot"
    assert expert_mix_configs.expand_mode(8, 16, (bf16, fp32, fp32, fp32)) == "gather"
    assert expert_mix_configs.expand_mode(8, 16, (fp32,) * 4) == "gather"
    assert expert_mix_configs.expand_mode(64, 64, (fp32,) * 4, top_k=8) == "gather"
