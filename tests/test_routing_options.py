"""NaN-safe router losses at any λ and σ, σ's range, and the routing options (off by default):
uniform token coupling, a decaying running load, frozen λ and σ."""
import collections

import pytest
import torch

import gmoe
from gmoe import losses
from gmoe.router import uniform_token_coupling
from gmoe_kernels.reference import normalized_adjacency
from tests.models import tiny_model


@pytest.mark.parametrize("num_experts", [8, 64])
@pytest.mark.parametrize("sigma", ["1e-3", "0.05", "0.2", "E/2", "10E"])
def test_normal_loss_is_finite_with_finite_gradients(num_experts, sigma):
    value = {"E/2": num_experts / 2, "10E": 10.0 * num_experts}.get(sigma) or float(sigma)
    std = torch.tensor([value], requires_grad=True)
    for load in (torch.rand(num_experts) * 10, torch.zeros(num_experts).index_fill(0, torch.tensor([0]), 5.0)):
        load = load.requires_grad_()
        loss = losses.normal_balance_loss(load, std)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(load.grad).all() and torch.isfinite(std.grad).all()
        std.grad = None


@pytest.mark.parametrize("num_experts", [8, 64])
@pytest.mark.parametrize("rate", [-5.0, 0.0, 1e-3, 1.5, 100.0, 1e30])
def test_poisson_loss_is_finite_with_finite_gradients(num_experts, rate):
    """At E 64 the linear-space target underflowed to exact zeros and the loss was NaN."""
    logits = torch.randn(5, num_experts, requires_grad=True)
    lam = torch.tensor([rate], requires_grad=True)
    loss = losses.poisson_distinction_loss(torch.softmax(logits, -1), lam)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and torch.isfinite(lam.grad).all()


def test_sigma_is_clamped_to_its_range():
    low, high = losses.normal_std_range(8)
    assert (low, high) == (1.0, 16.0)
    clamped = losses.normal_log_target(8, torch.tensor([low]))
    assert torch.equal(losses.normal_log_target(8, torch.tensor([1e-3])), clamped)
    assert torch.equal(losses.normal_log_target(8, torch.tensor([1e6])), losses.normal_log_target(8, torch.tensor([high])))
    std = torch.tensor([0.2], requires_grad=True)  # outside: no gradient, as λ outside [1, 2]
    losses.normal_balance_loss(torch.rand(8) + 0.1, std).backward()
    assert std.grad.item() == 0.0


@pytest.mark.parametrize("num_experts", [2, 4, 8, 16, 32, 64])
def test_within_the_range_a_uniform_load_beats_a_collapsed_one(num_experts):
    """The reason for σ's lower bound: below it a one-hot load can score better than a uniform one."""
    low, high = losses.normal_std_range(num_experts)
    uniform = torch.ones(num_experts)
    collapsed = torch.zeros(num_experts).index_fill(0, torch.tensor([0]), 1.0)
    for sigma in torch.linspace(low, high, 25):
        std = sigma.reshape(1)
        assert losses.normal_balance_loss(uniform, std) < losses.normal_balance_loss(collapsed, std)


def test_uniform_token_coupling():
    edges = torch.zeros(5, 5, dtype=torch.bool)
    for i, j in [(0, 1), (1, 2), (1, 3)]:  # degrees 1, 3, 1, 1, 0
        edges[i, j] = edges[j, i] = True
    a_hat = normalized_adjacency(edges)
    coupled = uniform_token_coupling(a_hat)
    degree = edges.sum(1).float() + 2  # + self-loop + token
    weight = (degree.mean() * 6).rsqrt()
    assert torch.allclose(coupled[:5, 5], weight.expand(5)) and torch.allclose(coupled[5, :5], weight.expand(5))
    assert torch.equal(coupled[:5, :5], a_hat[:5, :5]) and coupled[5, 5] == a_hat[5, 5]
    # a regular graph (every degree equal): uniform coupling is the GCN normalisation itself
    ring = torch.zeros(4, 4, dtype=torch.bool)
    for i in range(4):
        ring[i, (i + 1) % 4] = ring[(i + 1) % 4, i] = True
    assert torch.allclose(uniform_token_coupling(normalized_adjacency(ring)), normalized_adjacency(ring))


def _model(**options):
    torch.manual_seed(0)
    config = gmoe.GMoEConfig(num_experts=4, top_k=2, gcn_dim=16, edge_density=0.5, **options)
    return gmoe.get_gmoe_model(tiny_model("llama", hidden=32, inter=48, layers=2), config).train()


def _batch(seed):
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def test_uniform_coupling_reaches_the_router():
    model = _model(token_coupling="uniform")
    router = model.gmoe_layers()[0].router
    assert torch.equal(router.normalized_adjacency(), uniform_token_coupling(normalized_adjacency(router.expert_adjacency)))


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_running_load_decays_per_training_forward(decay):
    model = _model(load_decay=decay)
    batch_loads = collections.defaultdict(list)
    for i, layer in enumerate(model.gmoe_layers()):
        layer.register_forward_hook(lambda m, a, o, i=i: batch_loads[i].append(
            losses.batch_load(m.last_routing[0].gather(1, m.last_routing[1]), m.last_routing[1], 4).detach()))
    for seed in (1, 2, 3):
        model(**_batch(seed)).loss.backward()
    for i, layer in enumerate(model.gmoe_layers()):
        b1, b2, b3 = batch_loads[i]
        expected = 2 * (decay ** 2 * b1 + decay * b2 + b3)  # K = 2
        assert torch.allclose(layer.expert_load, expected, rtol=1e-6)


def test_frozen_loss_parameters_take_no_gradient():
    for options in (dict(freeze_loss_params=True), dict(freeze_loss_params=True, router="linear")):
        model = _model(**options)
        model(**_batch(1)).loss.backward()
        router = model.gmoe_layers()[0].router
        assert not router.poisson_rate.requires_grad and not router.normal_std.requires_grad
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None for p in trainable)
    default = _model()
    assert default.gmoe_layers()[0].router.normal_std.requires_grad


def test_options_round_trip_through_the_adapter(tmp_path):
    model = _model(token_coupling="uniform", load_decay=0.9, freeze_loss_params=True)
    model.save_pretrained(tmp_path)
    loaded = gmoe.GMoEModel.from_pretrained(tiny_model("llama", hidden=32, inter=48, layers=2), tmp_path)
    cfg = loaded.gmoe_config
    assert (cfg.token_coupling, cfg.load_decay, cfg.freeze_loss_params) == ("uniform", 0.9, True)


@pytest.mark.parametrize("field,value", [("load_decay", 0.0), ("load_decay", 1.5), ("load_decay", float("nan")),
                                         ("token_coupling", "degree-free"), ("freeze_loss_params", "yes")])
def test_invalid_options_are_refused(field, value):
    with pytest.raises(ValueError, match=f"GMoEConfig.{field}="):
        gmoe.GMoEConfig(**{field: value})


def test_version_1_adapter_config_reads_with_the_published_behaviour():
    data = gmoe.GMoEConfig().to_dict()
    for name in ("token_coupling", "load_decay", "freeze_loss_params"):
        del data[name]
    cfg = gmoe.GMoEConfig.from_dict({**data, "format_version": 1})
    assert (cfg.token_coupling, cfg.load_decay, cfg.freeze_loss_params) == ("degree", 1.0, False)
