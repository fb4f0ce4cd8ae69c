"""Worker side of the data-parallel tests (tests/test_distributed_engines.py).

Every engine runs the same recipe on its share of the same data, and the test compares what
each rank recorded with one process on the concatenated batch (`reference`, run in the test
process). Launched by the tests as

    python -m torch.distributed.run --nproc_per_node 2 -m tests.distributed_workers OUT ddp=graph,linear fsdp2=graph
    ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --config_file examples/accelerate/ddp.yaml \
        --num_processes 2 -m tests.distributed_workers OUT accelerate=graph_accum

Each job is ENGINE=SCENARIO[,SCENARIO...] (ENGINES, SCENARIOS), run one after the other in the
same processes; each rank writes OUT/ENGINE-SCENARIO-rankR.pt: a dict of what it recorded, or
{"error": traceback} when the scenario raised on that rank.

The recipe (`STEPS` optimizer steps of plain SGD, `BATCH` sequences per step in all):
- optimizer step s has BATCH sequences; rank r holds rows [r·B/W, (r+1)·B/W) of them; with
  gradient accumulation over `gas` micro-batches, rank r's micro-batch m is the m-th B/(W·gas)
  rows of its share, and the single-process micro-batch m is the concatenation over ranks of
  every rank's micro-batch m (what one process sees with the engine's data order);
- each micro-batch backpropagates loss / gas (as Trainer and Accelerate do);
- recorded: every micro-batch's loss and router loss, every trainable parameter's gradient
  at the first optimizer step (after the engine's averaging, full tensors), the expert load
  after the first step and at the end, and every trainable parameter after the last step.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

WORLD = 2
BATCH = 4    # sequences per optimizer step, all ranks together
SEQ = 8
VOCAB = 64   # tests.models.tiny_model
STEPS = 3
LR = 0.1
PAD = 3      # "padded" scenarios: the last PAD positions of every sequence of the last rank are padding
# Model and data are chosen so that nothing the losses' gradients jump at is near a tie (see
# `kink_margin`): top-k membership, the order of a token's sorted probabilities (Poisson loss), the
# |log| of either loss crossing zero. With E = 4 the expert graph has near-mirror experts whose
# probabilities stay close for every token; edge density 0.34 with this seed keeps them apart.
DATA_SEED = 100
MODEL_SEED = 6
EDGE_DENSITY = 0.34
MIN_MARGIN = 1e-4  # relative; fp32 differences between the engines and one process are ~1e-6

# router: graph (Poisson + Normal losses on) or linear (the Switch loss alone; λ, σ frozen)
SCENARIOS = {
    "graph": dict(router="graph", gas=1, padded=False),
    "graph_accum": dict(router="graph", gas=2, padded=False),
    "graph_padded": dict(router="graph", gas=1, padded=True),
    "linear": dict(router="linear", gas=1, padded=False),
    # the routing options: a decaying running load (a global statistic), λ and σ frozen, uniform token coupling
    "graph_options": dict(router="graph", gas=2, padded=False,
                          options=dict(load_decay=0.9, freeze_loss_params=True, token_coupling="uniform")),
    # the token readout (W_q in place of w_p; its own custom op), with the decaying load it runs with
    # (model seed 8: its nearest kink is 2.3e-4 away, where the shared seed's is 1.7e-5)
    "graph_token": dict(router="graph", gas=1, padded=False, model_seed=8,
                        options=dict(token_readout=True, token_init_gain=3.0, load_decay=0.9)),
}
ENGINES = ("ddp", "fsdp2", "accelerate", "trainer", "deepspeed", "deepspeed_zero3")
ROOT = Path(__file__).resolve().parents[1]


def gmoe_config(spec):
    from gmoe import GMoEConfig
    common = dict(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_layers=2, gcn_dim=16, edge_density=EDGE_DENSITY)
    if spec["router"] == "graph":
        return GMoEConfig(router="graph", poisson_loss_coef=0.05, normal_loss_coef=1.0, **common,
                          **spec.get("options", {}))
    return GMoEConfig(router="linear", poisson_loss_coef=0.0, normal_loss_coef=0.0, aux_loss_coef=0.1, **common)


def build_model(spec):
    """The same GMoE tiny Llama in every process (fixed seeds), in training mode.

    lora_B starts at zero, which would leave every lora_A without gradient: the B matrices
    get small random values so that every trainable parameter has a non-zero gradient.
    """
    from gmoe import get_gmoe_model
    from tests.models import tiny_model
    torch.manual_seed(spec.get("model_seed", MODEL_SEED))
    model = get_gmoe_model(tiny_model("llama", vocab=VOCAB), gmoe_config(spec))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return model.train()


def step_batch(step, padded):
    """The BATCH sequences of optimizer step `step`: input_ids, attention_mask, labels (-100 on padding)."""
    g = torch.Generator().manual_seed(DATA_SEED + step)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[BATCH - BATCH // WORLD:, SEQ - PAD:] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def rank_rows(rank, micro, gas):
    per_rank = BATCH // WORLD
    per_micro = per_rank // gas
    start = rank * per_rank + micro * per_micro
    return list(range(start, start + per_micro))


def micro_batches(step, spec, rank=None):
    """Rank `rank`'s micro-batches of optimizer step `step`; rank=None: the single process's,
    each the concatenation of every rank's micro-batch of the same index."""
    full = step_batch(step, spec["padded"])
    gas = spec["gas"]
    out = []
    for m in range(gas):
        rows = rank_rows(rank, m, gas) if rank is not None else sum((rank_rows(r, m, gas) for r in range(WORLD)), [])
        out.append({k: v[rows] for k, v in full.items()})
    return out


def causal_lm_mean(logits, labels):
    """Hugging Face's causal-LM loss: next-token cross entropy, mean over labels that are not -100."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def rank_objective(spec):
    """For the single process: what the engines' averaged gradient is the gradient of.

    Every rank's LM loss is the base model's mean over its own tokens, and the engine averages
    gradients over ranks, so with unequal token counts the LM part is the mean over ranks of
    per-rank means (not the global token mean); the router loss is global either way.
    With equal token counts this is exactly out.loss on the concatenated batch.
    """
    if not spec["padded"]:
        return None
    per_micro = BATCH // WORLD // spec["gas"]

    def objective(out, batch):
        lm = torch.stack([causal_lm_mean(out.logits[r * per_micro:(r + 1) * per_micro],
                                         batch["labels"][r * per_micro:(r + 1) * per_micro]) for r in range(WORLD)])
        return lm.mean() + out.router_loss
    return objective


def full_tensor(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grads_of(model, get_grad=None):
    get_grad = get_grad or (lambda p: p.grad)
    grads = {}
    for name, param in trainable(model):
        g = get_grad(param)
        grads[name] = None if g is None else full_tensor(g).detach().clone()
    return grads


def params_of(model, get_param=None):
    get_param = get_param or (lambda p: p)
    return {name: full_tensor(get_param(p)).detach().clone() for name, p in trainable(model)}


def new_record():
    return {"loss": [], "router_loss": [], "objective": [], "tokens": []}


def note(rec, out, batch, objective=None):
    rec["loss"].append(float(out.loss.detach()))
    rec["router_loss"].append(float(out.router_loss.detach()))
    rec["objective"].append(float((out.loss if objective is None else objective).detach()))
    rec["tokens"].append(int(batch["attention_mask"].sum()))


def run_recipe(model, forward, batches_of_step, gas, sync=None, objective=None, get_grad=None, get_param=None):
    """The recipe on one process: `forward` is the engine's wrapped model (or the model),
    `sync(is_last_micro)` a context manager that holds the engine's gradient sync back on all
    but the last micro-batch; `objective(out, batch)` replaces out.loss (reference only)."""
    sync = sync or (lambda last: contextlib.nullcontext())
    optimizer = torch.optim.SGD([p for _, p in trainable(model)], lr=LR)
    rec = new_record()
    for step in range(STEPS):
        micros = batches_of_step(step)
        assert len(micros) == gas
        for m, batch in enumerate(micros):
            with sync(m == gas - 1):
                out = forward(**batch)
                value = out.loss if objective is None else objective(out, batch)
                (value / gas).backward()
            note(rec, out, batch, value)
        if step == 0:
            rec["grads"] = grads_of(model, get_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            rec["load_1"] = model.expert_load()
    rec["params"] = params_of(model, get_param)
    rec["load"] = model.expert_load()
    rec["routing_slots"] = routing_slots(model)
    return rec


def routing_slots(model):
    """(layers, E) routing telemetry window (every training forward's top-K slots)."""
    return torch.stack([layer.routing_slots.detach().clone() for layer in model.gmoe_layers()])


def kink_margin(model, mask):
    """The smallest relative distance, over layers and non-padding tokens, to a point where a
    gradient of the last forward's losses is discontinuous: the K-th vs (K+1)-th probability (top-k
    membership; log ratio), neighbours in a token's sorted probabilities and p↓_i = q_i (Poisson loss,
    when on), ĉ_i = n_i (Normal loss, when on). Near one, fp32 rounding could pick the other side."""
    from gmoe import losses
    cfg = model.gmoe_config
    margins = []
    for layer in model.gmoe_layers():
        p = layer.last_routing[0].detach().double()
        if mask is not None:
            p = p[mask.reshape(-1).bool()]
        s = p.sort(dim=1, descending=True).values.clamp_min(1e-300)
        margins.append(float((s[:, cfg.top_k - 1].log() - s[:, cfg.top_k].log()).min()))
        if cfg.poisson_loss_coef > 0:
            q = losses.poisson_target(p.shape[1], layer.router.poisson_rate.detach()).double()
            margins.append(float((s[:, :-1].log() - s[:, 1:].log()).min()))
            margins.append(float(((s - q).abs() / q).min()))
        if cfg.normal_loss_coef > 0:
            n = losses.normal_target(p.shape[1], layer.router.normal_std.detach()).double()
            c = layer.expert_load.detach().double().sort(descending=True).values
            margins.append(float(((c / c.sum() - n).abs() / n).min()))
    return min(margins)


def reference(scenario):
    """One process, no process group, on the concatenated micro-batches; also records the
    smallest `kink_margin` met."""
    spec = SCENARIOS[scenario]
    model = build_model(spec)
    margins = []
    router_loss = model.router_loss

    def recording_router_loss(attention_mask=None):
        loss = router_loss(attention_mask)
        margins.append(kink_margin(model, attention_mask))
        return loss
    model.router_loss = recording_router_loss
    rec = run_recipe(model, model, lambda s: micro_batches(s, spec), spec["gas"], objective=rank_objective(spec))
    rec["kink_margin"] = min(margins)
    return rec


# ----------------------------------------------------------------------------- engines

def run_ddp(spec, rank):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = build_model(spec)
    ddp = DDP(model)  # find_unused_parameters=False: every trainable parameter must get a gradient
    return run_recipe(model, ddp, lambda s: micro_batches(s, spec, rank), spec["gas"],
                      sync=lambda last: contextlib.nullcontext() if last else ddp.no_sync())


def run_fsdp2(spec, rank):
    from torch.distributed.fsdp import fully_shard
    model = build_model(spec)
    for layer in model.base_model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    @contextlib.contextmanager
    def sync(last):
        model.set_requires_gradient_sync(last)
        yield
    return run_recipe(model, model, lambda s: micro_batches(s, spec, rank), spec["gas"], sync=sync)


def run_accelerate(spec, rank):
    """Accelerate's own loop: prepare, accumulate(), accelerator.backward (which divides by gas)."""
    from accelerate import Accelerator
    accelerator = Accelerator(gradient_accumulation_steps=spec["gas"], cpu=True)
    assert accelerator.num_processes == WORLD and accelerator.process_index == rank
    model = build_model(spec)
    optimizer = torch.optim.SGD([p for _, p in trainable(model)], lr=LR)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    rec = new_record()
    for step in range(STEPS):
        for batch in micro_batches(step, spec, rank):
            with accelerator.accumulate(wrapped):
                out = wrapped(**batch)
                accelerator.backward(out.loss)
                note(rec, out, batch)
                if step == 0 and accelerator.sync_gradients:
                    rec["grads"] = grads_of(model)
                optimizer.step()
                optimizer.zero_grad()
        if step == 0:
            rec["load_1"] = model.expert_load()
    rec["params"] = params_of(model)
    rec["load"] = model.expert_load()
    rec["routing_slots"] = routing_slots(model)
    return rec


class _StepData(torch.utils.data.Dataset):
    """Sample j is the row that Trainer's sharded sequential loader must hand to rank j % W
    as micro-batch (j // W) % gas of optimizer step j // (W·gas) (one sequence per micro-batch)."""

    def __init__(self, spec):
        self.spec = spec
        self.rows = []
        for step in range(STEPS):
            full = step_batch(step, spec["padded"])
            for m in range(spec["gas"]):
                for r in range(WORLD):
                    for row in rank_rows(r, m, spec["gas"]):
                        self.rows.append({k: v[row] for k, v in full.items()})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def run_trainer(spec, rank, out_dir):
    import transformers

    from gmoe.trainer import GMoETrainer
    assert BATCH // WORLD // spec["gas"] == 1, "the Trainer scenario feeds one sequence per micro-batch"
    rec = new_record()

    class RecordingTrainer(GMoETrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the data order the reference uses
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            note(rec, outputs, inputs)
            return (loss, outputs) if return_outputs else loss

    class Grads(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                rec["grads"] = grads_of(model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                rec["load_1"] = model.expert_load()

    model = build_model(spec)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"), max_steps=STEPS, per_device_train_batch_size=1,
        gradient_accumulation_steps=spec["gas"], learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, use_cpu=True, ddp_backend="gloo", ddp_find_unused_parameters=False,
        save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=1, dataloader_num_workers=0,
        seed=0, data_seed=0, remove_unused_columns=False)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=_StepData(spec), callbacks=[Grads()])
    trainer.train()
    rec["params"] = params_of(model)
    rec["load"] = model.expert_load()
    # GMoETrainer reads and resets the telemetry at every log (logging_steps 1): add up its windows
    windows = [torch.tensor([layer["slot_share"] for layer in h["layers"]]) * h["tokens"] * h["top_k"]
               for h in trainer.routing_history]
    assert len(windows) == STEPS, "GMoETrainer logged no routing window per step"
    rec["routing_slots"] = sum(windows) + routing_slots(model)
    return rec


def deepspeed_config(spec, stage):
    """examples/deepspeed/zero{stage}.json with its "auto" values filled as Accelerate or Trainer would."""
    import json
    config = json.loads((ROOT / "examples" / "deepspeed" / f"zero{stage}.json").read_text())
    config.update(train_micro_batch_size_per_gpu=BATCH // WORLD // spec["gas"],
                  gradient_accumulation_steps=spec["gas"], gradient_clipping=0.0)
    config["bf16"] = {"enabled": False}
    return config


def run_deepspeed(spec, rank, stage=2):
    import importlib

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    # DeepSpeed's CPU shared-memory all-reduce is a C++ extension compiled on first use
    # (minutes on 2 cores, and it needs a compiler): the test keeps to plain gloo.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    model = build_model(spec)
    params = [p for _, p in trainable(model)]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=deepspeed_config(spec, stage),
                                           optimizer=torch.optim.SGD(params, lr=LR))
    rec = new_record()
    for step in range(STEPS):
        for m, batch in enumerate(micro_batches(step, spec, rank)):
            out = engine(**batch)
            engine.backward(out.loss)  # divides by gradient_accumulation_steps
            note(rec, out, batch)
            if step == 0 and m == spec["gas"] - 1:
                rec["grads"] = grads_of(model, safe_get_full_grad)
            engine.step()
        if step == 0:
            rec["load_1"] = model.expert_load()
    rec["params"] = params_of(model, safe_get_full_fp32_param)
    rec["load"] = model.expert_load()
    rec["routing_slots"] = routing_slots(model)
    return rec


RUNNERS = {"ddp": run_ddp, "fsdp2": run_fsdp2, "accelerate": run_accelerate, "deepspeed": run_deepspeed,
           "deepspeed_zero3": lambda spec, rank: run_deepspeed(spec, rank, stage=3)}


def main(argv=None):
    """python -m tests.distributed_workers OUT ENGINE=SCENARIO[,SCENARIO...] ..."""
    argv = sys.argv[1:] if argv is None else argv
    out_dir, jobs = argv[0], [job.split("=") for job in argv[1:]]
    for engine, scenarios in jobs:
        if engine not in ENGINES or any(s not in SCENARIOS for s in scenarios.split(",")):
            raise SystemExit(f"unknown job {engine}={scenarios}; engines {ENGINES}, scenarios {tuple(SCENARIOS)}")
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo")  # Accelerate, Trainer and DeepSpeed take this group over
    rank = dist.get_rank()
    for engine, scenarios in jobs:
        for scenario in scenarios.split(","):
            spec = SCENARIOS[scenario]
            try:
                rec = run_trainer(spec, rank, out_dir) if engine == "trainer" else RUNNERS[engine](spec, rank)
                rec["world_size"] = dist.get_world_size()
            except Exception:
                rec = {"error": traceback.format_exc()}
                print(f"[rank {rank}] {engine}/{scenario} failed:\n{rec['error']}", file=sys.stderr, flush=True)
            torch.save(rec, os.path.join(out_dir, f"{engine}-{scenario}-rank{rank}.pt"))
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
