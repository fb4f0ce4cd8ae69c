"""No host synchronisation in the training forward and backward.

The GPU path (the GMoE layers and model in gmoe/, gmoe_kernels.functional, the Triton launchers)
must never make the host wait for the device. On a CPU that is checked two ways:
- tests.host_sync.record_host_syncs, a dispatch mode, on the real code (the Triton kernels run
  on the interpreter): value reads, data-dependent shapes, `.tolist()`; it sees inside the
  launchers' custom ops;
- FakeTensorMode, on the model's step: tensors without data raise at any read of a value or
  any data-dependent shape (there, the custom ops run their fake implementations).
The reference backend's expert mix (the CPU path) is allowed to synchronise and is not tested.
A warm-up step runs unrecorded first, as the GPU check does (tests.host_sync.check_training_step).
"""
import dataclasses
import itertools
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from gmoe import GMoEModel, get_gmoe_model
from gmoe.finetune.methods import AdapterSpec, gmoe_config
from gmoe.topology import build_expert_graph
from gmoe_kernels import functional
from gmoe_kernels.reference import normalized_adjacency
from tests.problems import expert_problem, router_problem
from tests.host_sync import check_training_step, record_host_syncs
from tests.models import tiny_model

SPEC = AdapterSpec(r=2, alpha=4.0, dropout=0.1, experts=4, top_k=2)
# graph router with the GMoE losses; linear router with them; linear router with the Switch loss
METHODS = ("gmoe", "gmoe-no-graph", "mixlora")
GRAPH_OPS = {"gmoe_kernels::graph_router_gcn", "gmoe_kernels::graph_router_gcn_backward"}
MIX_OPS = {"gmoe_kernels::expert_mix", "gmoe_kernels::expert_mix_backward"}


def _model(method="gmoe", backend="triton", adapter_seed=0):
    torch.manual_seed(0)
    base = tiny_model("llama", hidden=32, inter=64, layers=2)
    torch.manual_seed(adapter_seed)  # the expert graph's seed
    # Eager attention: sdpa's mask helper reads the padding mask on the host (transformers, not
    # ours); with eager attention the whole step is sync-free, as the GPU check needs.
    base.set_attn_implementation("eager")
    config = dataclasses.replace(gmoe_config(method, SPEC), gcn_dim=16, edge_density=0.5, backend=backend)
    model = get_gmoe_model(base, config).train()
    with torch.no_grad():  # B starts at zero: make every expert matter
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _step(model, batch):
    def step():
        model.zero_grad()
        out = model(**batch)  # out.loss includes the router loss
        out.loss.backward()
    return step


def _syncs(syncs):
    return "\n".join(map(str, syncs))


@pytest.mark.parametrize("method", METHODS)
def test_training_step_has_no_host_sync(method):
    model = _model(method)
    recorder = check_training_step(_step(model, _batch()))
    assert not recorder.ours(), "host synchronisations on the training path:\n" + _syncs(recorder.ours())
    # the routing telemetry ran inside the recorded step (warm-up and recorded step both counted)
    stats = model.routing_stats()
    assert stats.tokens == 2 * int(_batch()["attention_mask"].sum())
    # the effective number of experts was counted in the recorded step too (K = 2 bounds it)
    assert all(1.0 <= layer.effective_experts <= 2.0 + 1e-6 for layer in stats.layers)
    # and none from transformers either (eager attention): the GPU check needs the whole step clean
    assert not recorder.syncs, _syncs(recorder.syncs)
    assert MIX_OPS <= recorder.custom_ops  # the Triton launchers ran, under the recorder
    assert (GRAPH_OPS <= recorder.custom_ops) == (method == "gmoe")
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["gmoe", "mixlora"])
def test_training_step_reads_no_value_under_fake_tensors(method):
    model = _model(method)
    _step(model, _batch())()  # real tensors first: a real cached Â must not leak into the fake step
    model.report_non_finite()  # (and no real pending count either)
    load = [m.expert_load.clone() for m in model.gmoe_layers()]
    with FakeTensorMode() as mode:
        state = {n: mode.from_tensor(t) for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}
        batch = {k: mode.from_tensor(v) for k, v in _batch().items()}
        out = torch.func.functional_call(model, state, args=(), kwargs=batch)
        trainable = [t for t in state.values() if t.requires_grad]
        grads = torch.autograd.grad(out.loss, trainable)
    assert len(grads) == len(trainable) > 0
    assert all(torch.equal(m.expert_load, before) for m, before in zip(model.gmoe_layers(), load))


def test_non_finite_step_has_no_host_sync_and_warns_later(tmp_path):
    model = _model()
    batch = _batch()
    _step(model, batch)()
    load_before = model.expert_load()
    with torch.no_grad():
        model.get_input_embeddings().weight[batch["input_ids"][0, 5]] = float("nan")
    with record_host_syncs() as recorder:
        _step(model, batch)()
        _step(model, batch)()
    assert not recorder.ours(), _syncs(recorder.ours())
    # The deferred warning comes where the host reads anyway, once: GMoETrainer's logging ...
    import transformers  # (imported here: Trainer takes seconds to import)

    from gmoe.trainer import GMoETrainer
    trainer = GMoETrainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True))
    with pytest.warns(RuntimeWarning, match=r"non-finite router probabilities in \['model\.layers\.0\.mlp'.*\[2"):
        trainer.log({"loss": float("nan")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_after = model.expert_load()
    torch.testing.assert_close(load_after, load_before, atol=0, rtol=0)
    _step(model, batch)()
    with pytest.warns(RuntimeWarning, match=r"model\.layers\.0\.mlp"):  # ... or expert_load()
        model.expert_load()


def _functional_ops():
    """Forward and backward of every public op on the Triton backend, tiny shapes."""
    p = router_problem(T=6, H=8, G=16, E=4, L=2, dtype=torch.float32)
    logits, probs, indices, weights = functional.graph_router(**p, top_k=2, activation="silu", backend="triton")
    (logits.sum() + probs.square().sum() + weights.sum()).backward()
    idx, w = functional.topk_route(torch.softmax(torch.randn(6, 4, requires_grad=True), -1), 2, backend="triton")
    w.sum().backward()
    plan = functional.make_routing_plan(idx, 4, backend="triton")
    x = torch.randn(6, 8, requires_grad=True)
    rows = functional.dispatch(x, plan, backend="triton")
    functional.combine(rows * 2, torch.rand(6, 2, requires_grad=True), plan, backend="triton").sum().backward()
    x, frozen, lora, indices, weights = expert_problem(T=6, H=8, F=16, E=4, K=2, R=2, dtype=torch.float32,
                                                       routing="empty_expert")
    y = functional.expert_ffn(x, **frozen, **lora, indices=indices, weights=weights, scaling=2.0,
                              activation="silu", backend="triton")
    y.square().sum().backward()


def test_functional_ops_have_no_host_sync():
    _functional_ops()
    with record_host_syncs() as recorder:
        _functional_ops()
    assert not recorder.ours(), _syncs(recorder.ours())
    assert (GRAPH_OPS | MIX_OPS) <= recorder.custom_ops


# ----- the detectors catch each kind of synchronisation (so the tests above can fail) -----

_t = torch.tensor([1.0, -2.0, 3.0])
OFFENDERS = {
    "item": lambda: _t[0].item(),
    "bool": lambda: bool(_t[0] > 0),
    "if": lambda: 1 if (_t > 0).any() else 0,
    "int": lambda: int(_t.sum()),
    "bool_mask_index": lambda: _t[_t > 0],
    "bool_mask_assign": lambda: _t.clone().__setitem__(_t > 0, 0.0),
    "nonzero": lambda: torch.nonzero(_t),
    "where_1_arg": lambda: torch.where(_t > 0),
    "repeat_interleave_tensor": lambda: _t.repeat_interleave(torch.tensor([1, 2, 1])),
    "unique": lambda: torch.unique(_t),
    "equal": lambda: torch.equal(_t, _t),
    "tolist": lambda: _t.tolist(),
}
FAKE_RAISES = (DataDependentOutputException, DynamicOutputShapeException, RuntimeError)


@pytest.mark.parametrize("kind", list(OFFENDERS))
def test_recorder_catches(kind):
    with record_host_syncs() as recorder:
        OFFENDERS[kind]()
    assert recorder.syncs and all("test_host_sync.py" in s.where for s in recorder.syncs), recorder.syncs


# A bool-mask assignment keeps the shape, so fake tensors let it pass (and for a scalar value
# CUDA takes a masked_fill path); the recorder flags every bool-mask index, to be safe.
@pytest.mark.parametrize("kind", [k for k in OFFENDERS if k != "bool_mask_assign"])
def test_fake_tensors_catch(kind):
    global _t
    real = _t
    with FakeTensorMode() as mode:
        _t = mode.from_tensor(real)
        try:
            with pytest.raises(FAKE_RAISES):
                OFFENDERS[kind]()
        finally:
            _t = real


def test_recorder_names_our_code_and_allows_sync_free_ops():
    with record_host_syncs() as recorder:
        torch.nonzero_static(_t, size=3)
        _t.repeat_interleave(2)
        _t.repeat_interleave(torch.tensor([1, 2, 1]), output_size=4)
        torch.where(_t > 0, _t, 0.0)
        _t * (_t > 0)
    assert not recorder.syncs, _syncs(recorder.syncs)
    with record_host_syncs() as recorder:  # injection-time code that syncs, on purpose
        build_expert_graph(torch.randn(4, 8), 0.5)
    assert recorder.ours() and all(s.where.startswith("gmoe/topology.py") for s in recorder.ours())


# ----- the cached normalised adjacency Â -----

def test_cached_adjacency_follows_the_adjacency_buffer(tmp_path):
    source, target = _model(backend="reference"), _model(backend="reference", adapter_seed=5)
    adjacency = [m.router.expert_adjacency.clone() for m in source.gmoe_layers()]
    assert any(not torch.equal(a, m.router.expert_adjacency) for a, m in zip(adjacency, target.gmoe_layers()))
    keys = set(target.adapter_state_dict())
    batch = _batch()
    target(**batch)  # computes and caches Â of target's own graph
    router = target.gmoe_layers()[0].router
    assert router.normalized_adjacency() is router.normalized_adjacency()  # cached, not rebuilt
    assert set(target.adapter_state_dict()) == keys  # the cache is not saved with the adapter
    assert "_normalized_adjacency" not in str(list(router.state_dict()))

    def check(model):
        for m, a in zip(model.gmoe_layers(), adjacency):
            torch.testing.assert_close(m.router.normalized_adjacency(), normalized_adjacency(a), atol=0, rtol=0)

    target.load_adapter_state_dict(source.adapter_state_dict())  # in-place copies into the buffers
    check(target)
    source.eval(), target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(**batch).logits, source(**batch).logits, atol=0, rtol=0)
    # load_state_dict, casts and device moves, and from_pretrained onto a fresh graph
    other = _model(backend="reference", adapter_seed=5)
    other(**batch)
    for m, s in zip(other.gmoe_layers(), source.gmoe_layers()):
        m.router.load_state_dict(s.router.state_dict())
    check(other)
    check(other.double())
    source.save_pretrained(tmp_path)
    fresh = _model(backend="reference", adapter_seed=5)
    fresh(**batch)
    loaded = GMoEModel.from_pretrained(fresh.unload(), tmp_path)
    check(loaded)


def test_the_jobs_training_step_has_no_host_sync(tmp_path):
    """The fine-tuning job's trainer (its loss, logging windows, token count, step clock and SIGTERM check)
    adds no host sync to the step: values are read only at logging steps and checkpoints."""
    from gmoe.finetune.training import FinetuneTrainer, training_arguments

    model = _model("gmoe")
    args = training_arguments(str(tmp_path), seed=0, epochs=1, lr=1e-3, batch_size=2, grad_accum=1, warmup_ratio=0.0)
    trainer = FinetuneTrainer(model=model, args=args, train_dataset=[_batch()], checkpoint_root=str(tmp_path))
    batch = _batch()
    num_items = batch["labels"][:, 1:].ne(-100).sum()  # as Trainer counts it, once per step and outside it

    def step():
        trainer.training_step(model, dict(batch), num_items)
        for callback in (trainer.stop, *(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "_StepClock")):
            callback.on_step_begin(trainer.args, trainer.state, trainer.control)
            callback.on_step_end(trainer.args, trainer.state, trainer.control)

    recorder = check_training_step(step)
    assert not recorder.ours(), "host synchronisations in the job's step:\n" + _syncs(recorder.ours())
    assert trainer._micro == 2 and trainer._token_mean  # both steps were counted, on the device
    assert int(trainer._tokens) == 2 * int(batch["attention_mask"].sum())
