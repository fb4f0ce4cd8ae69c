"""torch.compile traces through the registered custom ops (fake + autograd registrations).

aot_eager exercises dynamo tracing, fake tensors and the autograd registration without
generating code, so it runs on this CPU under the Triton interpreter.
"""
import torch

from gmoe_kernels import functional
from tests.helpers import expert_problem, router_problem
from tests.tolerances import assert_close


def test_compiled_expert_ffn_matches_eager():
    x, frozen, lora, indices, weights = expert_problem(T=8, H=16, F=24, E=4, K=2, R=2, dtype=torch.float32)

    def ffn(x, weights, *lora_values):
        return functional.expert_ffn(x, *frozen.values(), *lora_values, indices, weights, 0.5, "silu",
                                     backend="triton")

    compiled = torch.compile(ffn, backend="aot_eager", fullgraph=True)
    inputs = (x, weights, *lora.values())
    y_eager, y_compiled = ffn(*inputs), compiled(*inputs)
    assert_close(y_compiled, y_eager, name="y")
    for a, b in zip(torch.autograd.grad(y_compiled.sum(), inputs), torch.autograd.grad(y_eager.sum(), inputs)):
        assert_close(a, b, name="grad")


def test_compiled_graph_router_matches_eager():
    p = router_problem(T=6, H=16, G=16, E=4, L=2, dtype=torch.float32)

    def router(x, token_weight):
        args = dict(p, x=x, token_weight=token_weight)
        return functional.graph_router(**args, top_k=2, activation="silu", backend="triton")

    compiled = torch.compile(router, backend="aot_eager", fullgraph=True)
    eager_out, compiled_out = router(p["x"], p["token_weight"]), compiled(p["x"], p["token_weight"])
    assert torch.equal(eager_out[2], compiled_out[2])
    assert_close(compiled_out[1], eager_out[1], name="probs")
    g_eager = torch.autograd.grad(eager_out[1].square().sum(), [p["x"], p["token_weight"]])
    g_compiled = torch.autograd.grad(compiled_out[1].square().sum(), [p["x"], p["token_weight"]])
    for a, b in zip(g_compiled, g_eager):
        assert_close(a, b, name="grad")
