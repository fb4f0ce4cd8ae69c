"""One fine-tuning job: data and split, the cached zero-shot score, then per (method, seed):
inject the adapter, train with Trainer, score the held-out part, save adapter, results and plots.
Each (method, seed) result is written as soon as it finishes and skipped when already present
with the same settings, so a long comparison resumes where it stopped. A run folder is replaced
whole (runfiles.py) and owned by one live process at a time (runlock.py)."""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from . import methods as M
from . import plots, report, runfiles, runlock
from .encoding import PadCollator, training_features
from .data import Data, prepare_data  # noqa: F401  (prepare_data: the job's data, patched in tests)
from .multitask import job_name, macro
from .options import (DataOptions, EvalOptions, ModelOptions, OutputOptions, RerunOptions, ScoringOptions,
                      SelectionOptions, TrackingOptions, TrainOptions)
from .routing import measure_routing
from .scoring import evaluate
from .selection import Selector, no_selection
from .validate import check_config


@dataclass
class JobConfig(ModelOptions, DataOptions, ScoringOptions, TrainOptions, SelectionOptions, OutputOptions, RerunOptions,
                TrackingOptions, EvalOptions):
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
    def __init__(self, cfg: JobConfig, log=print):
        self.cfg, self.log = cfg, log
        check_config(cfg)  # every argument, before any data, model or output is touched
        self.data = prepare_data(cfg)
        self._base = self._tok = None

    # ----- model -----
    def base(self):
        if self._base is None:
            from .assets import load_base_model

            start = time.perf_counter()
            self._base, self._tok = load_base_model(self.cfg.model, self.cfg.torch_dtype(),
                                                    self.cfg.attn_implementation)
            if torch.cuda.is_available():
                self._base.to("cuda")
            self.log(f"loaded {self.cfg.model} in {time.perf_counter() - start:.1f}s")
        return self._base, self._tok

    def _evaluate(self, model, tok, examples) -> dict:
        """acc, acc_norm, predictions and throughput on `examples`."""
        res = evaluate(model, tok, examples, batch_size=self.cfg.eval_batch_size,
                       max_length=self.cfg.max_length, max_batch_tokens=self.cfg.eval_batch_tokens)
        return {k: v for k, v in res.items() if k not in ("loglikelihoods", "predictions_norm")}

    def _score(self, model, tok, which: str = "eval") -> dict:
        """The held-out ("eval") or selection ("selection") score; several tasks: each task's and their mean."""
        parts = self.data.parts(which)
        if list(parts) == [None]:
            return self._evaluate(model, tok, parts[None])
        return macro({t: self._evaluate(model, tok, ex) for t, ex in parts.items()})

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
        if os.path.isfile(path):
            cached = report.read_json(path)
            if cached.get("key") == json.loads(json.dumps(key, default=str)):
                return cached["result"]
        base, tok = self.base()
        self.log(f"zero-shot scoring of {len(data.eval)} held-out {cfg.task} examples ...")
        result = self._evaluate(base, tok, data.eval)
        report.write_json(path, {"key": key, "result": result})
        self.log(f"zero-shot {cfg.task}: acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}")
        return result

    # ----- one (method, seed) -----
    def run(self, method: str, seed: int) -> dict:
        """The (method, seed) result: the verified one on disk, or a new run. Raises runlock.RunBusy
        when another live process is running it (with or without --force: see runlock.py)."""
        cfg = self.cfg
        out = run_dir(cfg, method, seed)
        done = None if cfg.force else self.finished(method, seed)
        if done is not None:
            self.log(f"{method} seed {seed}: already done ({os.path.join(out, 'results.json')}), skipped")
            return done
        zero = self.zero_shot()
        with runlock.claim(out):
            removed = runfiles.remove_leftovers(out)
            if removed:
                self.log(f"{method} seed {seed}: removed {len(removed)} folder(s) left by a crashed run")
            done = None if cfg.force else self.finished(method, seed)  # finished by another process meanwhile
            return done if done is not None else self._run(method, seed, out, zero)

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

    def _run(self, method, seed, out, zero) -> dict:
        """Train and score into a fresh folder beside `out`, then swap it in whole (runfiles.py)."""
        new = runfiles.fresh_dir(out)
        try:
            result = self._run_into(method, seed, new, out, zero)
            runfiles.swap_in(new, out)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        zero, tuned = result["zero_shot"], result["finetuned"]
        self.log(f"{method} seed {seed}: zero-shot acc {zero['acc']:.4f} -> fine-tuned acc {tuned['acc']:.4f} "
                 f"(acc_norm {zero['acc_norm']:.4f} -> {tuned['acc_norm']:.4f}); {out}/results.json")
        return result

    def _run_into(self, method, seed, new, out, zero) -> dict:
        cfg = self.cfg
        import transformers

        base, tok = self.base()
        transformers.set_seed(seed)
        model = M.apply_method(copy.deepcopy(base), method, cfg.spec())
        routing_at_injection = measure_routing(model, tok, self.data.eval, cfg.max_length)
        params = M.trainable_parameters(model)
        self.log(f"{method} seed {seed}: {params['trainable']:,} trainable of {params['total']:,} parameters")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        wall = time.perf_counter()
        train = self._train(model, tok, method, seed, new)
        selection = train.pop("selection")
        finetuned = self._score(model, tok)
        routing = {"injection": routing_at_injection, "trained": measure_routing(model, tok, self.data.eval, cfg.max_length)}
        adapter = os.path.join(new, "adapter")
        model.save_pretrained(adapter)
        runfiles.chmod_default(adapter)
        result = {
            "task": job_name(cfg.task), **self._task_list(), "method": method, "seed": seed, "model": cfg.model,
            "budget": cfg.training_budget(),
            "config": dataclasses.asdict(cfg), "adapter_config": _adapter_config(model),
            "split": self.data.split, "zero_shot": zero, "finetuned": finetuned, "selection": selection,
            "trainable_params": params, "train": train, "routing": routing, "peak_memory": report.peak_memory_mib(),
            "precision": cfg.precision_info(),
            "wall_seconds": time.perf_counter() - wall, "versions": report.versions(),
            "machine": report.machine(), "adapter": os.path.join(out, "adapter"),
            "adapter_sha256": runfiles.adapter_digest(adapter),
        }
        result["plots"] = runfiles.relocate(self._plots(result, train, new), new, out)
        report.write_json(os.path.join(new, "results.json"), result)  # last: the folder is complete
        del model
        gc.collect()  # Trainer, optimizer and adapter hold reference cycles: free them before the next run
        return result

    def _train(self, model, tok, method, seed, out) -> dict:
        from .training import FinetuneTrainer, training_arguments

        cfg = self.cfg
        if not self.data.train:
            raise ValueError("no training examples: check --train-file / --max-train-examples")
        feats = training_features(tok, self.data.train, cfg.max_length)
        args = training_arguments(os.path.join(out, "trainer"), seed, cfg.epochs, cfg.lr, cfg.batch_size,
                                  cfg.grad_accum, cfg.warmup_ratio, cfg.max_steps, cfg.log_steps,
                                  dtype=cfg.torch_dtype(), gradient_checkpointing=cfg.gradient_checkpointing,
                                  report_to=cfg.report_to)
        selector = None
        if cfg.eval_steps is not None:
            selector = Selector(model, lambda m: self._score(m, tok, "selection"), cfg.eval_steps,
                                keep_best=cfg.select == "best", log=self.log)
        trainer = FinetuneTrainer(model=model, args=args, train_dataset=feats, data_collator=PadCollator(tok.pad_token_id),
                                  callbacks=[selector] if selector else None)
        self.log(f"training {method} seed {seed} on {len(feats)} examples ...")
        metrics = trainer.train().metrics
        steps = trainer.state.global_step
        if selector is None:
            selection = no_selection(steps)
        else:
            if cfg.select == "best":
                selector.restore_best()
            selection = selector.result(cfg.select, len(self.data.selection), steps, self.data.selection_info)
            self.log(f"{method} seed {seed}: kept the adapter of step {selection['step']} of {steps} "
                     f"(--select {cfg.select}; selection acc {selector.best['acc']:.4f} at step {selector.best['step']})")
        if trainer.routing_history:
            s = trainer.routing_history[-1]["summary"]
            self.log(f"routing in the last logging window (means over layers): busiest expert "
                     f"{s['busiest_share']:.3f} of the slots (balanced {1 / cfg.experts:.3f}), "
                     f"{s['top_set_fraction']:.3f} of tokens on the most common top-{cfg.top_k} set")
        seconds = metrics.get("train_runtime")
        history = [dict(r) for r in trainer.state.log_history]
        return {"seconds": seconds, "steps": steps, "examples": len(feats), "selection": selection,
                "tokens": trainer.train_tokens,
                "tokens_per_s": trainer.train_tokens / seconds if seconds else None,
                "final_train_loss": metrics.get("train_loss"), "log_history": history,
                "routing_history": trainer.routing_history}

    def _plots(self, result, train, out) -> dict:
        title = f"{result['model']} · {result['task']} · {result['method']} · seed {result['seed']}"
        paths = {"loss": plots.loss_curves(train["log_history"], os.path.join(out, "loss.png"), title)}
        routing = plots.routing_over_training(train["routing_history"], os.path.join(out, "routing.png"), title)
        if routing:
            paths["routing"] = routing
        return paths

    # ----- eval-only -----
    def eval_only(self) -> dict:
        cfg = self.cfg
        zero = self.zero_shot()
        result = {"task": job_name(cfg.task), **self._task_list(), "model": cfg.model, "split": self.data.split,
                  "zero_shot": zero,
                  "precision": cfg.precision_info(),
                  "versions": report.versions(), "machine": report.machine()}
        if cfg.adapter:
            base, tok = self.base()
            model = M.load_adapter(copy.deepcopy(base), cfg.adapter)
            result["adapter"] = cfg.adapter
            result["finetuned"] = self._score(model, tok)
        name = "eval-" + (_digest(os.path.abspath(cfg.adapter)) if cfg.adapter else "zero-shot")
        path = os.path.join(task_dir(cfg), f"{name}.json")
        report.write_json(path, result)
        result["path"] = path
        return result

    def _task_list(self) -> dict:
        """{"tasks": [...]} for a job of several tasks, else nothing (single-task results stay as they were)."""
        return {"tasks": list(self.data.tasks)} if self.data.tasks else {}

    # ----- several methods and seeds -----
    def compare(self) -> dict:
        """Run every asked (method, seed) not done yet, then rebuild the summary from what is on disk.

        The summary is written under a lock (`.summary.lock` in the task folder) and read from disk
        inside it, so of two processes sharing an output folder the one that writes last lists
        every run finished by then. Runs another live process holds are skipped and returned in
        "busy"; asked runs with no finished result are listed in "missing" (the table says so)."""
        busy = []
        # seed-major order: a table stopped half-way has every method at its first seeds
        for s in self.cfg.seeds:
            for m in self.cfg.methods:
                try:
                    self.run(m, s)
                except runlock.RunBusy as err:
                    self.log(f"{m} seed {s}: skipped: {err}")
                    busy.append({"method": m, "seed": s, "reason": str(err)})
        with runlock.claim(os.path.join(task_dir(self.cfg), "summary"), wait=True):
            results, missing = self.finished_results()
            summary = self.write_summary(results, missing)
        summary["busy"] = busy
        summary["runs"] = [{"method": m, "seed": r["seed"], "files": [
            os.path.join(run_dir(self.cfg, m, r["seed"]), "results.json"), *r.get("plots", {}).values()]}
            for m, rs in results.items() for r in rs]
        return summary

    def finished_results(self) -> tuple[dict, list]:
        """{method: [results of its finished seeds]} of the asked methods and seeds, and the
        (method, seed) pairs asked for that have no finished result."""
        results, missing = {}, []
        for m in self.cfg.methods:
            for s in self.cfg.seeds:
                done = self.finished(m, s)
                if done is None:
                    missing.append((m, s))
                else:
                    results.setdefault(m, []).append(done)
        return results, missing

    def write_summary(self, results: dict, missing: list = ()) -> dict:
        cfg = self.cfg
        zero = self.zero_shot()
        parts = self.data.parts()
        chance = sum(sum(1.0 / ex.num_choices for ex in ex_) / len(ex_) for ex_ in parts.values()) / len(parts)
        summary = report.summarize(job_name(cfg.task), zero, results, chance=chance)
        summary["split"] = self.data.split
        summary["budget"] = cfg.training_budget()
        summary["preset"] = cfg.preset
        summary["machine"], summary["versions"] = report.machine(), report.versions()
        name = "compare" if len(cfg.methods) > 1 else f"summary-{cfg.methods[0]}"
        base = os.path.join(task_dir(cfg), name)
        s = self.data.split
        header = (f"**{job_name(cfg.task)}** ({cfg.model}): train {s['train_used']} / held-out eval {s['eval_used']} examples "
                  f"of {s['source']} (split seed {s['split_seed']}); budget: {cfg.epochs:g} epoch(s), lr {cfg.lr:g}, "
                  f"batch {cfg.batch_size}×{cfg.grad_accum}, warmup {cfg.warmup_ratio:g}, r {cfg.r}, alpha {cfg.alpha:g}, "
                  f"E {cfg.experts}, K {cfg.top_k}; seeds {cfg.seeds}")
        if self.data.tasks:
            header += (f"; tasks {', '.join(self.data.tasks)} trained together (mixture shuffled with seed "
                       f"{s['mix_seed']}), acc the mean over tasks; counts per task as listed below")
        summary["markdown"] = report.markdown_table(summary, header)
        summary["missing"] = [{"method": m, "seed": s} for m, s in missing]
        if missing:
            summary["markdown"] += f"\nPARTIAL: no finished result yet for {_pairs(missing)}.\n"
        report.write_text(base + ".md", summary["markdown"])
        summary["plot"] = plots.comparison_bars(summary["rows"], base + ".png",
                                                f"{job_name(cfg.task)}: acc, mean ± std over seeds")
        report.write_json(base + ".json", summary)
        summary["paths"] = {"markdown": base + ".md", "json": base + ".json", "plot": summary["plot"]}
        return summary


def _adapter_config(model) -> dict:
    cfg = getattr(model, "gmoe_config", None)
    if cfg is not None:
        return cfg.to_dict()
    peft_cfg = getattr(model, "peft_config", {}).get("default")
    return json.loads(json.dumps(peft_cfg.to_dict(), default=str)) if peft_cfg is not None else {}


def _diff(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _pairs(pairs) -> str:
    return ", ".join(f"{m} seed {s}" for m, s in pairs)
