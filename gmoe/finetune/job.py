"""One fine-tuning job: data and split, the cached zero-shot score, then per (method, seed) one run
(trainrun.py: inject, train, score, save). Each (method, seed) result is written as soon as it finishes
and skipped when already present with the same settings, so a long comparison resumes where it stopped;
a run that was interrupted resumes from its last checkpoint (checkpoints.py). A run folder is replaced
whole (runfiles.py) and owned by one live process at a time (runlock.py).

On several processes (distributed.py) every rank runs the same job: rank 0 decides (claim, skip, resume)
and alone writes files; the others follow through collectives. Scoring is sharded over the ranks."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from . import checkpoints, distributed, report, runfiles, runlock, trainrun
from . import methods as M
from .data import Data, prepare_data  # noqa: F401  (prepare_data: the job's data, patched in tests)
from .multitask import job_name, macro
from .options import (CheckpointOptions, DataOptions, EvalOptions, ModelOptions, OutputOptions, RerunOptions,
                      ScoringOptions, SelectionOptions, TrackingOptions, TrainOptions)
from .scoring import evaluate
from .validate import check_config


@dataclass
class JobConfig(ModelOptions, DataOptions, ScoringOptions, TrainOptions, SelectionOptions, CheckpointOptions,
                OutputOptions, RerunOptions, TrackingOptions, EvalOptions):
    """One job's settings: the option fields (options.py, where every default lives) plus the
    methods and seeds to run."""
    methods: list[str] = field(default_factory=lambda: ["gmoe"])
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_only: bool = False
    preset: str | None = None

    @classmethod
    def from_fields(cls, values: dict, **extra) -> JobConfig:
        """The config of the keys of `values` that are fields (a parsed command line, or a run's recorded
        config from an older or newer version); other keys are ignored. `extra` sets fields besides."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known}, **extra)

    def spec(self) -> M.AdapterSpec:
        return M.AdapterSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, experts=self.experts, top_k=self.top_k)

    def training_budget(self) -> dict:
        """What must be identical across methods for a fair comparison (stored in every result)."""
        keys = ("model", "task", "epochs", "max_steps", "lr", "batch_size", "grad_accum", "max_length",
                "warmup_ratio", "r", "alpha", "dropout", "experts", "top_k", "train_file", "eval_file",
                "split_seed", "eval_fraction", "eval_size", "max_train_examples", "max_eval_examples")
        budget = {k: getattr(self, k) for k in keys}
        budget["task"] = job_name(self.task)  # one task: its name; several: their folder name (multitask.py)
        if self.dataset:  # only then: budgets of runs on the packaged data stay as they were
            budget.update(dataset=self.dataset, dataset_config=self.dataset_config, train_split=self.train_split,
                          eval_split=self.eval_split)
        if self.eval_steps is not None:  # only then: runs without checkpoint selection keep their budget
            budget.update(eval_steps=self.eval_steps, select=self.select, selection_size=self.selection_size)
        if self.torch_dtype() != torch.float32:  # only then: budgets of fp32 runs stay as they were
            budget["dtype"] = str(self.torch_dtype()).replace("torch.", "")
        return budget

    def torch_dtype(self) -> torch.dtype:
        from .assets import resolve_dtype

        return resolve_dtype(self.dtype)

    def precision_info(self) -> dict:
        from .training import precision

        return {"dtype": str(self.torch_dtype()).replace("torch.", ""), "asked": self.dtype,
                "mixed_precision": precision(self.torch_dtype()),
                "gradient_checkpointing": self.gradient_checkpointing,
                "attn_implementation": self.attn_implementation}


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def task_dir(cfg: JobConfig) -> str:
    """`<output-dir>/<task>`; several tasks: `<output-dir>/<a+b+...>` or the group's name (multitask.job_name)."""
    return os.path.join(cfg.output_dir, job_name(cfg.task))


def run_dir(cfg: JobConfig, method: str, seed: int) -> str:
    return os.path.join(task_dir(cfg), method, f"seed{seed}")


def zero_shot_key(cfg: JobConfig, data: Data) -> dict:
    key = {"model": cfg.model, "task": cfg.task, "split": data.split, "max_length": cfg.max_length}
    budget = cfg.training_budget()
    if "dtype" in budget:  # float32 caches keep their old key
        key["dtype"] = budget["dtype"]
    return key


class Job:
    def __init__(self, cfg: JobConfig, log=print, ranks: distributed.Ranks | None = None):
        self.cfg = cfg
        self.ranks = ranks if ranks is not None else distributed.from_env()
        self.log = log if self.ranks.is_main else _quiet
        # every argument, before any data, model or output is touched; then the data (every rank reads it)
        distributed.agree(self.ranks, "checking the arguments", check_config, cfg)
        self.data = distributed.agree(self.ranks, "preparing the data", prepare_data, cfg)
        self._base = self._tok = None

    # ----- model -----
    def base(self):
        if self._base is None:
            from .assets import load_base_model

            start = time.perf_counter()
            self._base, self._tok = distributed.agree(self.ranks, "loading the model", load_base_model, self.cfg.model,
                                                      self.cfg.torch_dtype(), self.cfg.attn_implementation)
            self._base.to(self.ranks.device())  # this rank's own GPU (LOCAL_RANK), never plain "cuda"
            self.log(f"loaded {self.cfg.model} in {time.perf_counter() - start:.1f}s")
        return self._base, self._tok

    def evaluate(self, model, tok, examples) -> dict:
        """acc, acc_norm, predictions and throughput on `examples`, sharded over the ranks."""
        res = evaluate(model, tok, examples, batch_size=self.cfg.eval_batch_size, max_length=self.cfg.max_length,
                       max_batch_tokens=self.cfg.eval_batch_tokens, ranks=self.ranks,
                       equal_forwards=self.ranks.engine not in ("single", "ddp"))
        return {k: v for k, v in res.items() if k not in ("loglikelihoods", "predictions_norm")}

    def score(self, model, tok, which: str = "eval") -> dict:
        """The held-out ("eval") or selection ("selection") score; several tasks: each task's and their mean."""
        parts = self.data.parts(which)
        if list(parts) == [None]:
            return self.evaluate(model, tok, parts[None])
        return macro({t: self.evaluate(model, tok, ex) for t, ex in parts.items()})

    # ----- zero-shot, cached per task and split -----
    def zero_shot(self) -> dict:
        """The bare base model's held-out score; several tasks: each task's (cached as that task's alone)
        and their mean."""
        if not self.data.tasks:
            return self._zero_shot(self.cfg, self.data)
        return macro({t: self._zero_shot(dataclasses.replace(self.cfg, task=t), d) for t, d in self.data.tasks.items()})

    def _zero_shot(self, cfg: JobConfig, data: Data) -> dict:
        key = zero_shot_key(cfg, data)
        path = os.path.join(task_dir(cfg), f"zero_shot-{_digest(key)}.json")
        cached = distributed.broadcast(self.ranks, _read_cache(path, key) if self.ranks.is_main else None)
        if cached is not None:
            return cached
        base, tok = self.base()
        self.log(f"zero-shot scoring of {len(data.eval)} held-out {cfg.task} examples ...")
        result = self.evaluate(base, tok, data.eval)
        if self.ranks.is_main:
            report.write_json(path, {"key": key, "result": result})
        self.log(f"zero-shot {cfg.task}: acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}")
        return result

    # ----- one (method, seed) -----
    def run(self, method: str, seed: int) -> dict:
        """The (method, seed) result: the verified one on disk, or a new run (resumed from its newest
        complete checkpoint, if any). Raises runlock.RunBusy on every rank when another live process is
        running it (with or without --force: see runlock.py)."""
        out = run_dir(self.cfg, method, seed)
        claim = _Claim()
        try:
            decision = distributed.broadcast(self.ranks, distributed.agree(
                self.ranks, f"claiming {method} seed {seed}", self._decide, method, seed, out, claim))
            if "busy" in decision:
                raise runlock.RunBusy(decision["busy"])
            if "done" in decision:
                self.log(f"{method} seed {seed}: already done ({os.path.join(out, 'results.json')}), skipped")
                return decision["done"]
            return self._run(method, seed, out, decision["resume"])
        finally:
            claim.release()

    def _decide(self, method: str, seed: int, out: str, claim: _Claim) -> dict | None:
        """Rank 0: skip ({"done": result}), refuse ({"busy": why}) or run ({"resume": checkpoint or None}),
        holding the run's lock in `claim` from then on. Other ranks: None (they learn it by broadcast)."""
        if not self.ranks.is_main:
            return None
        done = None if self.cfg.force else self.finished(method, seed)
        if done is not None:
            return {"done": done}
        try:
            claim.lock = runlock.claim(out)
        except runlock.RunBusy as err:
            return {"busy": str(err)}
        removed = runfiles.remove_leftovers(out)
        if removed:
            self.log(f"{method} seed {seed}: removed {len(removed)} folder(s) left by a crashed run")
        done = None if self.cfg.force else self.finished(method, seed)  # finished by another process meanwhile
        if done is not None:
            return {"done": done}
        root = checkpoints.checkpoint_root(out)
        if self.cfg.force:
            checkpoints.remove(root)
        found = checkpoints.newest(root, self.log)
        return {"resume": found[0] if found else None}

    def _run(self, method: str, seed: int, out: str, resume: str | None) -> dict:
        """Train and score into a fresh folder beside `out`, then swap it in whole (runfiles.py)."""
        zero = self.zero_shot()
        new = runfiles.fresh_dir(out) if self.ranks.is_main else None
        try:
            result = trainrun.run(self, method, seed, new, out, zero, resume)
            distributed.agree(self.ranks, f"putting {method} seed {seed} in place", self._finish, new, out)
        except BaseException:
            if new is not None:
                shutil.rmtree(new, ignore_errors=True)
            raise
        z, tuned = result["zero_shot"], result["finetuned"]
        self.log(f"{method} seed {seed}: zero-shot acc {z['acc']:.4f} -> fine-tuned acc {tuned['acc']:.4f} "
                 f"(acc_norm {z['acc_norm']:.4f} -> {tuned['acc_norm']:.4f}); {out}/results.json")
        return result

    def _finish(self, new: str | None, out: str) -> None:
        if self.ranks.is_main:
            runfiles.swap_in(new, out)
            checkpoints.remove(checkpoints.checkpoint_root(out))  # the run is complete: nothing to resume

    def finished(self, method: str, seed: int) -> dict | None:
        """The finished result of (method, seed) on disk, or None. A ValueError when it was made with
        other settings or its adapter files no longer match the sha256 it recorded."""
        out = run_dir(self.cfg, method, seed)
        path = os.path.join(out, "results.json")
        if not os.path.isfile(path):
            return None
        done = report.read_json(path)
        budget = self.cfg.training_budget()
        if done.get("budget") != json.loads(json.dumps(budget)):
            raise ValueError(f"{path} holds a result with other settings; use another --output-dir or --force "
                             f"(differences: {_diff(done.get('budget', {}), budget)})")
        if "adapter_sha256" in done:  # results of older versions have none: trusted as before
            runfiles.check_adapter_digest(os.path.join(out, "adapter"), done["adapter_sha256"], path)
        return done

    # ----- eval-only -----
    def eval_only(self) -> dict:
        cfg = self.cfg
        zero = self.zero_shot()
        result = {"task": job_name(cfg.task), **self.task_list(), "model": cfg.model, "split": self.data.split,
                  "zero_shot": zero, "precision": cfg.precision_info(),
                  "versions": report.versions(), "machine": report.machine()}
        if cfg.adapter:
            base, tok = self.base()
            model = distributed.agree(self.ranks, "loading the adapter", M.load_adapter, copy.deepcopy(base),
                                      cfg.adapter)
            result["adapter"] = cfg.adapter
            result["finetuned"] = self.score(model, tok)
        name = "eval-" + (_digest(os.path.abspath(cfg.adapter)) if cfg.adapter else "zero-shot")
        path = os.path.join(task_dir(cfg), f"{name}.json")
        if self.ranks.is_main:
            report.write_json(path, result)
        result["path"] = path
        return result

    def task_list(self) -> dict:
        """{"tasks": [...]} for a job of several tasks, else nothing (single-task results stay as they were)."""
        return {"tasks": list(self.data.tasks)} if self.data.tasks else {}

    # ----- several methods and seeds -----
    def compare(self) -> dict:
        """Every asked (method, seed), then the summary table (summary.py)."""
        from .summary import compare

        return compare(self)


class _Claim:
    """Rank 0's lock of the run being decided and run (none on the other ranks)."""

    lock: runlock.RunLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0: rank 0 speaks for the job."""


def _read_cache(path: str, key: dict) -> dict | None:
    if not os.path.isfile(path):
        return None
    cached = report.read_json(path)
    return cached["result"] if cached.get("key") == json.loads(json.dumps(key, default=str)) else None


def _diff(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
