"""One (method, seed) of a job, on every rank: inject the adapter, train (resuming from a checkpoint when
one is given), score the held-out part, and on rank 0 write the adapter, the plots and results.json into
the fresh folder `new` (job.py swaps it in). A SIGTERM ends training after a checkpoint and raises
training.Preempted; nothing is scored or written then."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import os
import time

import torch

from . import checkpoints, distributed, plots, report, runfiles
from . import methods as M
from .encoding import PadCollator, training_features
from .measure import REPORT_EXAMPLES, measure_routing
from .multitask import job_name
from .selection import Selector, no_selection


def run(job, method: str, seed: int, new: str | None, out: str, zero: dict, resume: str | None) -> dict:
    """The result of (method, seed) (every rank returns it; rank 0 has written it into `new`)."""
    import transformers

    cfg, ranks = job.cfg, job.ranks
    base, tok = job.base()
    transformers.set_seed(seed)
    model = M.apply_method(copy.deepcopy(base), method, cfg.spec())
    routing_at_injection = held_out_routing(job, model, tok)
    params = M.trainable_parameters(model)
    job.log(f"{method} seed {seed}: {params['trainable']:,} trainable of {params['total']:,} parameters")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wall = time.perf_counter()
    train, trainer = _train(job, model, tok, method, seed, out, resume)
    selection = train.pop("selection")
    finetuned = job.score(model, tok)
    routing = _by_stage(routing_at_injection, held_out_routing(job, model, tok))
    memory = distributed.gather(ranks, report.peak_memory_mib())
    result = None
    with full_parameters(model):  # every rank: under ZeRO-3 / FSDP2 the parameters are gathered for saving
        if ranks.is_main:
            model.save_pretrained(os.path.join(new, "adapter"))
    if ranks.is_main:
        adapter = os.path.join(new, "adapter")
        runfiles.chmod_default(adapter)
        result = {
            "task": job_name(cfg.task), **job.task_list(), "method": method, "seed": seed, "model": cfg.model,
            "budget": cfg.training_budget(),
            "config": dataclasses.asdict(cfg), "adapter_config": _adapter_config(model),
            "split": job.data.split, "zero_shot": zero, "finetuned": finetuned, "selection": selection,
            "trainable_params": params, "train": train, "routing": routing, "peak_memory": memory[0],
            "distributed": {"world_size": ranks.world_size, "engine": ranks.engine,
                            "global_batch": cfg.batch_size * cfg.grad_accum,
                            "per_device_batch": cfg.batch_size // ranks.world_size, "grad_accum": cfg.grad_accum,
                            "peak_memory_per_rank": memory},
            "precision": cfg.precision_info(),
            "wall_seconds": time.perf_counter() - wall, "versions": report.versions(),
            "machine": report.machine(), "adapter": os.path.join(out, "adapter"),
            "adapter_sha256": runfiles.adapter_digest(adapter),
        }
        result["plots"] = runfiles.relocate(_plots(result, train, new), new, out)
        report.write_json(os.path.join(new, "results.json"), result)  # last: the folder is complete
    result = distributed.broadcast(ranks, result)
    del model, trainer
    gc.collect()  # Trainer, optimizer and adapter hold reference cycles: free them before the next run
    return result


def _train(job, model, tok, method: str, seed: int, out: str, resume: str | None) -> tuple[dict, object]:
    from .training import FinetuneTrainer, Preempted, training_arguments

    cfg, ranks = job.cfg, job.ranks
    if not job.data.train:
        raise ValueError("no training examples: check --train-file / --max-train-examples")
    feats = training_features(tok, job.data.train, cfg.max_length)
    root = checkpoints.checkpoint_root(out)
    args = training_arguments(root, seed, cfg.epochs, cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.warmup_ratio,
                              cfg.max_steps, cfg.log_steps, dtype=cfg.torch_dtype(),
                              gradient_checkpointing=cfg.gradient_checkpointing, report_to=cfg.report_to,
                              save_steps=cfg.save_steps, world_size=ranks.world_size)
    selector = None
    if cfg.eval_steps is not None:
        selector = Selector(model, lambda m: job.score(m, tok, "selection"), cfg.eval_steps,
                            keep_best=cfg.select == "best", log=job.log)
    trainer = FinetuneTrainer(model=model, args=args, train_dataset=feats, data_collator=PadCollator(tok.pad_token_id),
                              callbacks=[selector] if selector else None, ranks=ranks, checkpoint_root=root,
                              save_total_limit=cfg.save_total_limit, selector=selector)
    if resume is not None:
        trainer.load_job_state(resume)
        job.log(f"{method} seed {seed}: resuming from {resume} (step {_step_of(resume)})")
    job.log(f"training {method} seed {seed} on {len(feats)} examples on {ranks.world_size} process(es) "
            f"({ranks.engine}) ...")
    trainer.stop.install()
    try:
        metrics = trainer.train(resume_from_checkpoint=resume).metrics
    finally:
        trainer.stop.uninstall()
    steps = trainer.state.global_step
    if trainer.stop.stopped_at is not None:
        found = checkpoints.newest(root, job.log) if ranks.is_main else None
        raise Preempted(steps, found[0] if found else None)
    if selector is None:
        selection = no_selection(steps)
    else:
        if cfg.select == "best":
            selector.restore_best()
        selection = selector.result(cfg.select, len(job.data.selection), steps, job.data.selection_info)
        job.log(f"{method} seed {seed}: kept the adapter of step {selection['step']} of {steps} "
                f"(--select {cfg.select}; selection acc {selector.best['acc']:.4f} at step {selector.best['step']})")
    if trainer.routing_history:
        s = trainer.routing_history[-1]["summary"]
        job.log(f"routing in the last logging window (means over layers): busiest expert "
                f"{s['busiest_share']:.3f} of the slots (balanced {1 / cfg.experts:.3f}), "
                f"{s['top_set_fraction']:.3f} of tokens on the most common top-{cfg.top_k} set")
    seconds = metrics.get("train_runtime")
    tokens = trainer.train_tokens()
    history = [dict(r) for r in trainer.state.log_history]
    return {"seconds": seconds, "steps": steps, "examples": len(feats), "selection": selection,
            "tokens": tokens["global"], "tokens_per_s": tokens["this_launch"] / seconds if seconds else None,
            "median_step_seconds": trainer.median_step_seconds(), "resumed_from_step": _step_of(resume),
            "final_train_loss": metrics.get("train_loss"), "log_history": history,
            "routing_history": trainer.routing_history}, trainer


@contextlib.contextmanager
def full_parameters(model):
    """The whole of every parameter on every rank while inside (a collective: every rank enters): DeepSpeed
    ZeRO-3 partitions parameters above its persistence threshold, FSDP2 shards them along dim 0. Nothing to
    do for DDP, ZeRO-2 or one process."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id") and p.requires_grad]  # the adapter only
    sharded = [m for m in model.modules() if type(m).__name__.startswith("FSDP") and hasattr(m, "unshard")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            yield
        return
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()


def held_out_routing(job, model, tok) -> dict:
    """Routing telemetry on the held-out examples (several tasks: interleaved), and for a mixture each task's
    own, on as many of its examples as the interleaved report takes of it: whether tasks use other experts."""
    cfg = job.cfg
    out = {"all": measure_routing(model, tok, job.data.eval, cfg.max_length)}
    if job.data.tasks and out["all"] is not None:
        share = max(1, REPORT_EXAMPLES // len(job.data.tasks))
        out["tasks"] = {t: measure_routing(model, tok, d.eval, cfg.max_length, max_examples=share)
                        for t, d in job.data.tasks.items()}
    return out


def _by_stage(injection: dict, trained: dict) -> dict:
    """results.json's "routing": {"injection", "trained"} as before, plus "tasks": {task: {"injection", "trained"}}."""
    routing = {"injection": injection["all"], "trained": trained["all"]}
    if "tasks" in injection:
        routing["tasks"] = {t: {"injection": injection["tasks"][t], "trained": trained["tasks"][t]}
                            for t in injection["tasks"]}
    return routing


def _step_of(checkpoint: str | None) -> int | None:
    return None if checkpoint is None else int(os.path.basename(checkpoint).rsplit("-", 1)[1])


def _adapter_config(model) -> dict:
    cfg = getattr(model, "gmoe_config", None)
    if cfg is not None:
        return cfg.to_dict()
    peft_cfg = getattr(model, "peft_config", {}).get("default")
    return json.loads(json.dumps(peft_cfg.to_dict(), default=str)) if peft_cfg is not None else {}


def _plots(result, train, out) -> dict:
    title = f"{result['model']} · {result['task']} · {result['method']} · seed {result['seed']}"
    paths = {"loss": plots.loss_curves(train["log_history"], os.path.join(out, "loss.png"), title)}
    routing = plots.routing_over_training(train["routing_history"], os.path.join(out, "routing.png"), title)
    if routing:
        paths["routing"] = routing
    return paths
