"""torch.compile traces through the registered custom ops (fake + autograd registrations).

aot_eager exercises dynamo tracing, fake tensors and the autograd registration without
generating code, so it runs on this CPU under the Triton interpreter.
"""
import torch

from gmoe_kernels import functional
from tests.problems import expert_problem, router_problem
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


def test_compiled_dispatch_combine_match_eager():
    """dispatch and combine (public ops the model layer does not call) trace whole with
    fullgraph, through their custom ops, forward and backward."""
    T, H, E, K = 7, 12, 4, 2
    probs = torch.softmax(torch.randn(T, E), -1)
    indices, weights = functional.topk_route(probs, K, backend="reference")
    plan = functional.make_routing_plan(indices, E, backend="triton")
    x = torch.randn(T, H, requires_grad=True)
    weights = weights.detach().requires_grad_()

    def route(x, weights):
        rows = functional.dispatch(x, plan, backend="triton")
        return functional.combine(rows * 1.5, weights, plan, backend="triton")

    compiled = torch.compile(route, backend="aot_eager", fullgraph=True)
    out_eager, out_compiled = route(x, weights), compiled(x, weights)
    assert_close(out_compiled, out_eager, name="out")
    for a, b in zip(torch.autograd.grad(out_compiled.square().sum(), [x, weights]),
                    torch.autograd.grad(out_eager.square().sum(), [x, weights])):
        assert_close(a, b, name="grad")


# ----------------------------------------------------------------------------- whole model, reference path
# aot_eager traces forward and backward through AOTAutograd without generating code. inductor
# works too where a C compiler is present, but needs over a minute per layer on 2 cores.

def _gmoe_model(layers=1):
    from gmoe import GMoEConfig, get_gmoe_model
    from tests.models import tiny_model
    torch.manual_seed(0)
    model = get_gmoe_model(tiny_model("llama", layers=layers),
                           GMoEConfig(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_dim=16, edge_density=0.5,
                                      backend="reference"))
    with torch.no_grad():  # non-zero LoRA B, so every adapter gradient is non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.train()


def test_compiled_model_trains_like_eager():
    eager, compiled = _gmoe_model(), _gmoe_model()
    run = torch.compile(compiled, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (eager, compiled)]
    for _ in range(2):  # the second step runs the compiled graphs again, with the updated weights
        outs = []
        for fn in (eager, run):
            out = fn(input_ids=ids, attention_mask=mask, labels=ids)
            out.loss.backward()
            outs.append(out)
        assert_close(outs[1].loss, outs[0].loss, name="loss")
        assert_close(outs[1].router_loss, outs[0].router_loss, name="router_loss")
        assert_close(compiled.expert_load(), eager.expert_load(), name="load")
        for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
            if a.requires_grad:
                assert b.grad is not None, name
                assert_close(b.grad, a.grad, name=f"grad {name}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    assert compiled.expert_load().sum() > 0


def test_gmoe_layer_compiles_without_graph_breaks():
    layer = _gmoe_model().gmoe_layers()[0]
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y_compiled = compiled(x)
    y_eager = layer(x)
    assert_close(y_compiled, y_eager, name="y")
    # λ and σ only enter the router losses, outside the layer
    names, params = zip(*[(n, p) for n, p in layer.named_parameters()
                          if p.requires_grad and not n.endswith(("poisson_rate", "normal_std"))])
    for name, a, b in zip(("x", *names), torch.autograd.grad(y_compiled.square().sum(), [x, *params]),
                          torch.autograd.grad(y_eager.square().sum(), [x, *params])):
        assert_close(a, b, name=f"grad {name}")
