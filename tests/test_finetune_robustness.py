"""Results a later run can trust after a crash, a concurrent run or a hand edit: a run folder is
all old or all new, the adapter's sha256 is checked on skip, a (method, seed) has exactly one
live owner (real concurrent processes), stale markers block nothing, and the summary is rebuilt
from disk by whichever process writes it last."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.finetune_assets import TINY_RUN, tiny_job_files
from gmoe.finetune.cli import BUSY, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_files(tmp_path_factory.mktemp("robust"))


def _argv(setup, out, *extra, method="gmoe"):
    _, model, data = setup
    return ["--model", model, "--task", "obqa", "--method", method, "--train-file", data,
            "--output-dir", str(out), *TINY_RUN, *extra]


def _python(code: str, *args, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_forced_rerun_killed_right_after_the_adapter_save_leaves_the_old_run_whole(setup, capsys):
    out = setup[0] / "killed"
    assert main(_argv(setup, out)) == 0
    run = out / "obqa" / "gmoe" / "seed0"
    before = {p.name: p.read_bytes() for p in (run / "adapter").iterdir()}
    # a --force rerun with another budget, SIGKILLed the moment its adapter file is written
    killer = _python("""
        import os, signal, sys
        import gmoe
        from gmoe.finetune.cli import main
        save = gmoe.GMoEModel.save_pretrained
        def save_then_die(self, path):
            save(self, path)
            os.kill(os.getpid(), signal.SIGKILL)
        gmoe.GMoEModel.save_pretrained = save_then_die
        main(sys.argv[1:])
    """, *_argv(setup, out, "--max-steps", "3", "--force"))
    killer.communicate(timeout=300)
    assert killer.returncode == -signal.SIGKILL
    capsys.readouterr()
    assert main(_argv(setup, out)) == 0
    assert "already done" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (run / "adapter").iterdir()} == before
    assert json.loads((run / "results.json").read_text())["train"]["steps"] == 2
    # the next run that takes the lock removes what the killed one left beside the folder
    assert main(_argv(setup, out, "--force")) == 0
    assert sorted(p.name for p in (out / "obqa" / "gmoe").iterdir() if p.is_dir()) == ["seed0"]


def test_an_adapter_changed_after_its_run_is_not_trusted(setup, capsys):
    out = setup[0] / "tampered"
    assert main(_argv(setup, out)) == 0
    run = out / "obqa" / "gmoe" / "seed0"
    res = json.loads((run / "results.json").read_text())
    assert set(res["adapter_sha256"]) == {"adapter_model.safetensors", "adapter_config.json"}
    config = run / "adapter" / "adapter_config.json"
    config.write_text(config.read_text() + " ")
    capsys.readouterr()
    assert main(_argv(setup, out)) == 2
    assert "adapter_config.json differ from the sha256 recorded in" in capsys.readouterr().err
    assert main(_argv(setup, out, "--force")) == 0  # --force replaces it with a consistent run


@pytest.mark.parametrize("force", [False, True])
def test_a_stale_running_marker_with_a_live_pid_blocks_nothing(setup, capsys, force):
    out = setup[0] / f"stale-{force}"
    run = out / "obqa" / "gmoe" / "seed0"
    if force:
        assert main(_argv(setup, out)) == 0
    run.mkdir(parents=True, exist_ok=True)
    (run / ".running").write_text("1")  # init: alive, and no fine-tuning job
    capsys.readouterr()
    assert main(_argv(setup, out, *(["--force"] if force else []))) == 0
    printed = capsys.readouterr().out
    assert "being run by" not in printed and (run / "results.json").is_file()
    assert not (run / ".running").exists()


def _hold(run_folder: str):
    """A separate live process holding the run's lock until its stdin closes."""
    holder = _python("""
        import sys
        from gmoe.finetune.runlock import claim
        lock = claim(sys.argv[1])
        print("held", flush=True)
        sys.stdin.read()
    """, run_folder, stdin=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_held_by_a_live_process_is_refused_with_a_non_zero_exit(setup, capsys):
    out = setup[0] / "held"
    run = out / "obqa" / "gmoe" / "seed0"
    holder = _hold(str(run))
    try:
        for extra in ([], ["--force"]):
            assert main(_argv(setup, out, *extra)) == BUSY
            captured = capsys.readouterr()
            assert f"gmoe seed 0 not run here: {run} is being run by pid {holder.pid}" in captured.err
            assert "results.json" not in captured.out  # no path to a file that does not exist
            assert not run.exists()
    finally:
        holder.communicate("")
    assert main(_argv(setup, out)) == 0  # released with its process


def _claim_worker(root: str, trials: int, barrier, owners) -> None:
    from gmoe.finetune.runlock import RunBusy, claim

    for t in range(trials):
        barrier.wait()
        try:
            lock = claim(os.path.join(root, f"t{t}", "seed0"))
        except RunBusy:
            lock = None
        else:
            with owners.get_lock():
                owners[t] += 1
        barrier.wait()  # everyone has tried before the owner lets go
        if lock is not None:
            lock.release()


def test_concurrent_claims_have_exactly_one_owner(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs_n, trials = 4, 200
    barrier, owners = ctx.Barrier(procs_n), ctx.Array("i", trials)
    procs = [ctx.Process(target=_claim_worker, args=(str(tmp_path), trials, barrier, owners)) for _ in range(procs_n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert list(owners) == [1] * trials


def test_two_compare_processes_leave_a_table_of_every_finished_run(setup):
    _, model, data = setup
    out = setup[0] / "two"
    argv = ["-m", "gmoe.finetune", "compare", "--model", model, "--task", "obqa", "--methods", "gmoe,lora",
            "--seeds", "2", "--train-file", data, "--output-dir", str(out), *TINY_RUN]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    finished = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, finished):
        assert p.returncode in (0, BUSY), stderr
        assert (p.returncode == BUSY) == ("not run here" in stderr)
    on_disk = {m: sorted(s for s in (0, 1) if (out / "obqa" / m / f"seed{s}" / "results.json").is_file())
               for m in ("gmoe", "lora")}
    assert on_disk == {"gmoe": [0, 1], "lora": [0, 1]}  # whoever skipped a run, the other one ran it
    summary = json.loads((out / "obqa" / "compare.json").read_text())
    assert {r["method"]: sorted(r["seeds"]) for r in summary["rows"][1:]} == on_disk
    assert summary["missing"] == [] and "PARTIAL" not in (out / "obqa" / "compare.md").read_text()
    assert "| gmoe | " in (out / "obqa" / "compare.md").read_text()


def test_a_summary_with_runs_missing_says_it_is_partial(setup, capsys):
    out = setup[0] / "partial"
    _, model, data = setup
    argv = ["compare", "--model", model, "--task", "obqa", "--methods", "gmoe,lora", "--train-file", data,
            "--output-dir", str(out), *TINY_RUN]
    holder = _hold(str(out / "obqa" / "lora" / "seed0"))
    try:
        assert main(argv) == BUSY
    finally:
        holder.communicate("")
    text = (out / "obqa" / "compare.md").read_text()
    assert "PARTIAL: no finished result yet for lora seed 0" in text
    assert json.loads((out / "obqa" / "compare.json").read_text())["missing"] == [{"method": "lora", "seed": 0}]
    capsys.readouterr()
    assert main(argv) == 0  # the other process is gone: the table is completed
    assert "PARTIAL" not in (out / "obqa" / "compare.md").read_text()


def test_outputs_follow_the_users_umask(setup):
    _, model, data = setup
    out = setup[0] / "modes"
    old = os.umask(0o022)
    try:
        assert main(["compare", "--model", model, "--task", "obqa", "--methods", "gmoe,lora", "--train-file", data,
                     "--output-dir", str(out), *TINY_RUN]) == 0
    finally:
        os.umask(old)
    run = out / "obqa" / "gmoe" / "seed0"
    files = [run / "results.json", run / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_config.json",
             run / "loss.png", out / "obqa" / "lora" / "seed0" / "adapter" / "adapter_model.safetensors",
             out / "obqa" / "compare.md", out / "obqa" / "compare.json"]
    assert {str(f): oct(f.stat().st_mode & 0o777) for f in files} == {str(f): "0o644" for f in files}
    assert oct(run.stat().st_mode & 0o777) == "0o755"
