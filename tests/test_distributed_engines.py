"""Data parallelism on the engines users bring: 2 gloo processes on the CPU against one process.

The contract (README, "Scaling out"), checked for each engine and scenario
(tests/distributed_workers.py builds the model and the data, and runs the ranks):
- the loss: the mean over ranks of every rank's loss equals the single process's loss on the
  concatenated micro-batch (the engines average gradients, so that mean is the loss they train);
  the router loss is global: equal on every rank to the single process's;
- every trainable parameter's gradient after the engine's averaging equals the single
  process's (relative error ||a - b|| / ||b|| < 1e-4; the reference gradients are non-zero);
- every rank holds the single process's running expert load after the first step and at the end;
- the trainable parameters after 3 SGD steps equal the single process's.

Gradient accumulation over 2 micro-batches (scenario graph_accum): rank r's micro-batch m is one
sequence; the single-process reference runs the same 2 micro-batches, micro-batch m being the
concatenation of both ranks' micro-batch m, each backpropagating loss / 2. That is the exact
reference: the Normal loss of micro-batch m is a function of the running load after micro-batch
m (global over ranks), so it is not the loss of one process on all 4 sequences in one batch. The
load after the whole step is that of one process on all 4 sequences in one batch (checked too).

Unequal non-padding tokens (scenario graph_padded: the second rank's sequences end in padding):
the GMoE losses are global (Poisson: a mean over the global token count; load and Normal loss:
the global load), so the router loss and the load equal the single process's. The LM loss is the
base model's mean over each rank's own tokens, and the engine averages over ranks: the gradient
is that of the mean over ranks of per-rank LM means plus the router loss, computed here in one
process (not the global token mean of the LM loss, which one process on the batch would give).

Relative error bound: fp32 sums reordered across ranks and batch shapes give about 1e-6 here;
the bound 1e-4 is used.
"""
from __future__ import annotations

import functools
import os

try:
    import fcntl
except ImportError:  # not on Windows: no lock, each xdist worker launches its own ranks
    fcntl = None
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import distributed_workers as dw

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-4
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ)
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT)]
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", ACCELERATE_DISABLE_RICH="1", **extra)
    env.pop("GMOE_BACKEND", None)
    return env


def _tail(text, n=6000):
    return text if len(text) <= n else "…" + text[-n:]


def launch(launcher, jobs, out_dir, env=None):
    """Run tests.distributed_workers on 2 processes with `jobs` {engine: scenarios};
    returns ({(engine, scenario): [rank 0 record, rank 1 record]}, the launch's output)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", *launcher, "-m", "tests.distributed_workers", str(out_dir),
           *(f"{engine}={','.join(scenarios)}" for engine, scenarios in jobs.items())]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the ranks did not finish in {TIMEOUT} s: {' '.join(cmd)}\n"
                    f"stdout:\n{_tail(err.stdout or '')}\nstderr:\n{_tail(err.stderr or '')}")
    output = f"command: {' '.join(cmd)}\nexit code {proc.returncode}\nstdout:\n{_tail(proc.stdout)}\n" \
             f"stderr:\n{_tail(proc.stderr)}"
    (out_dir / "launch.log").write_text(output)
    return collect(jobs, out_dir, output, proc.returncode)


def collect(jobs, out_dir, output, returncode):
    runs = {}
    for engine, scenarios in jobs.items():
        for scenario in scenarios:
            files = [out_dir / f"{engine}-{scenario}-rank{r}.pt" for r in range(dw.WORLD)]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                pytest.fail(f"no record {missing} from the ranks\n{output}")
            runs[engine, scenario] = [torch.load(f, weights_only=False) for f in files]
    if returncode != 0 and not any("error" in rec for recs in runs.values() for rec in recs):
        pytest.fail(f"the launcher failed\n{output}")
    return runs, output


def launch_once(name, launcher, jobs, tmp_path_factory, env=None):
    """`launch`, shared by the pytest-xdist workers of one session through a file lock: the first
    worker runs the ranks, the others read the records it wrote."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out_dir = shared / f"distributed-{name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(shared / f"distributed-{name}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        log = out_dir / "launch.log"
        if not log.is_file():
            return launch(launcher, jobs, out_dir, env)
        return collect(jobs, out_dir, log.read_text(), returncode=0)


def torchrun():
    return ["torch.distributed.run", "--nproc_per_node", str(dw.WORLD), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port())]


@functools.cache
def reference(scenario):
    torch.manual_seed(0)
    return dw.reference(scenario)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_matches_one_process(ranks, scenario, output="", check_router_loss=True):
    """The contract of the module docstring, for every rank's record against one process."""
    for r, rec in enumerate(ranks):
        if "error" in rec:
            pytest.fail(f"rank {r} raised in scenario {scenario}:\n{rec['error']}\n{output}")
    ref = reference(scenario)
    assert ref["kink_margin"] > dw.MIN_MARGIN, (
        f"the test's premise fails on this machine: a loss gradient is discontinuous within "
        f"{ref['kink_margin']:.1e} (relative) of where one process runs, so fp32 rounding may land the ranks on the "
        "other side; choose DATA_SEED / MODEL_SEED in tests/distributed_workers.py with a larger margin")
    assert ranks[0]["world_size"] == dw.WORLD
    problems = []
    mean_loss = torch.tensor([rec["loss"] for rec in ranks]).double().mean(0)
    if rel_err(mean_loss, torch.tensor(ref["objective"])) > 1e-5:
        problems.append(f"mean over ranks of the loss per micro-batch {mean_loss.tolist()} != one process "
                        f"{ref['objective']}")
    for r, rec in enumerate(ranks):
        if check_router_loss and rel_err(torch.tensor(rec["router_loss"]), torch.tensor(ref["router_loss"])) > 1e-5:
            problems.append(f"rank {r}: router loss {rec['router_loss']} != one process {ref['router_loss']}")
        for key in ("load_1", "load", "routing_slots"):  # the load and the telemetry are global
            if rel_err(rec[key], ref[key]) > 1e-5:
                problems.append(f"rank {r}: expert load ({key}) {rec[key].tolist()} != one process {ref[key].tolist()}")
        assert set(rec["grads"]) == set(ref["grads"]), "the ranks train other parameters than one process"
        for name, expected in ref["grads"].items():
            assert expected is not None and expected.abs().sum() > 0, f"one process has no gradient for {name}"
            got = rec["grads"][name]
            if got is None:
                problems.append(f"rank {r}: no gradient for {name}")
            elif rel_err(got, expected) > RTOL:
                problems.append(f"rank {r}: gradient of {name}: relative error {rel_err(got, expected):.2e}")
        for name, expected in ref["params"].items():
            if rel_err(rec["params"][name], expected) > RTOL:
                problems.append(f"rank {r}: {name} after {dw.STEPS} steps: relative error "
                                f"{rel_err(rec['params'][name], expected):.2e}")
    assert not problems, f"{scenario}: {len(problems)} mismatches with one process:\n" + "\n".join(problems[:40])


# ----------------------------------------------------------------------------- torchrun: DDP, FSDP2, DeepSpeed, Trainer

DDP_SCENARIOS = ("graph", "graph_accum", "graph_padded", "linear", "graph_options", "graph_token")
TORCHRUN_JOBS = {"ddp": DDP_SCENARIOS, "fsdp2": ("graph", "graph_accum", "graph_options", "graph_token"),
                 "deepspeed": ("graph_accum",),
                 "deepspeed_zero3": ("graph_accum",), "trainer": ("graph_accum",)}


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """One torchrun launch runs every engine's scenarios in the same 2 processes (one start-up),
    once per test session even when pytest-xdist spreads these tests over several workers."""
    return launch_once("torchrun", torchrun(), TORCHRUN_JOBS, tmp_path_factory, env=_env(DS_ACCELERATOR="cpu"))


@pytest.mark.parametrize("scenario", DDP_SCENARIOS)
def test_ddp_matches_one_process(torchrun_runs, scenario):
    """torch DistributedDataParallel (find_unused_parameters=False; no_sync on the first
    micro-batch of graph_accum)."""
    runs, output = torchrun_runs
    assert_matches_one_process(runs["ddp", scenario], scenario, output)


def test_accumulated_load_equals_one_batch(torchrun_runs):
    """After a whole accumulated step the load is one process's on all 4 sequences in one batch."""
    runs, _ = torchrun_runs
    one_batch = reference("graph")  # the same data and model, gas 1
    for rec in runs["ddp", "graph_accum"]:
        assert rel_err(rec["load_1"], one_batch["load_1"]) < 1e-5


def test_padded_scenario_has_unequal_token_counts(torchrun_runs):
    runs, _ = torchrun_runs
    tokens = [rec["tokens"][0] for rec in runs["ddp", "graph_padded"]]
    assert tokens == [dw.SEQ * dw.BATCH // dw.WORLD, (dw.SEQ - dw.PAD) * dw.BATCH // dw.WORLD]


@pytest.mark.parametrize("scenario", TORCHRUN_JOBS["fsdp2"])
def test_fsdp2_matches_one_process(torchrun_runs, scenario):
    """FSDP2: `fully_shard` on every decoder layer, then on the model, on gloo; with gradient
    accumulation, `set_requires_gradient_sync(False)` on the first micro-batch."""
    runs, output = torchrun_runs
    assert_matches_one_process(runs["fsdp2", scenario], scenario, output)


@pytest.mark.parametrize("engine", ["deepspeed", "deepspeed_zero3"])
def test_deepspeed_matches_one_process(torchrun_runs, engine):
    """DeepSpeed ZeRO-2 and ZeRO-3 (examples/deepspeed/zero2.json, zero3.json) on DeepSpeed's CPU
    accelerator (DS_ACCELERATOR=cpu) over gloo, with the engine's own gradient accumulation; full
    gradients and fp32 parameters through deepspeed.utils.safe_get_full_grad / safe_get_full_fp32_param."""
    runs, output = torchrun_runs
    ranks = runs[engine, "graph_accum"]
    if any("No module named 'deepspeed'" in rec.get("error", "") for rec in ranks):
        pytest.skip("deepspeed is not installed")
    assert_matches_one_process(ranks, "graph_accum", output)


def test_trainer_with_accumulation_matches_one_process(torchrun_runs):
    """gmoe.trainer.GMoETrainer under torchrun, gradient_accumulation_steps=2, SGD, constant LR,
    ddp_find_unused_parameters=False (Trainer turns it on by default for a model that is not a
    PreTrainedModel); the gradients are read in on_pre_optimizer_step."""
    runs, output = torchrun_runs
    assert_matches_one_process(runs["trainer", "graph_accum"], "graph_accum", output)


# ----------------------------------------------------------------------------- accelerate launch

def test_accelerate_launch_ddp_with_accumulation_matches_one_process(tmp_path):
    """`accelerate launch --config_file examples/accelerate/ddp.yaml` (its multi-process launcher;
    ACCELERATE_USE_CPU=1 puts the ranks on gloo), `accelerator.accumulate` over 2 micro-batches."""
    launcher = ["accelerate.commands.launch", "--config_file", str(ROOT / "examples/accelerate/ddp.yaml"),
                "--num_processes", str(dw.WORLD), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(_free_port())]
    runs, output = launch(launcher, {"accelerate": ("graph_accum",)}, tmp_path, env=_env(ACCELERATE_USE_CPU="1"))
    assert_matches_one_process(runs["accelerate", "graph_accum"], "graph_accum", output)


# ----------------------------------------------------------------------------- examples

def test_example_train_distributed_under_torchrun(tmp_path):
    """examples/train_distributed.py on 2 ranks: trains, every rank holds the same load, and the
    adapter it saves loads back onto the base model."""
    from gmoe import GMoEModel
    from examples.train_tiny import tiny_llama
    cmd = [sys.executable, "-m", *torchrun(), str(ROOT / "examples" / "train_distributed.py"), "--steps", "3",
           "--seq-len", "32", "--batch-size", "2", "--num-experts", "4", "--gcn-dim", "16", "--save", str(tmp_path / "adapter")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{_tail(proc.stdout)}\nstderr:\n{_tail(proc.stderr)}"
    assert "expert load identical on all 2 ranks: True" in proc.stdout
    model = GMoEModel.from_pretrained(tiny_llama(seed=0), tmp_path / "adapter")
    assert model.expert_load().sum() > 0


@pytest.mark.parametrize("name, kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP")])
def test_accelerate_configs_parse(name, kind):
    """The shipped Accelerate configs load with Accelerate's own reader (fsdp.yaml: FSDP2).
    Accelerate applies FSDP on GPUs only, so fsdp.yaml's sharding is not exercised on this CPU machine."""
    from accelerate.commands.config.config_args import load_config_from_file
    config = load_config_from_file(str(ROOT / "examples" / "accelerate" / name))
    assert str(config.distributed_type).endswith(kind)
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
