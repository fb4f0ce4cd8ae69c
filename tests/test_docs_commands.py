"""Every command in README.md and docs/*.md is exercised, so a recipe cannot rot: the commands of each
```bash block (and the runnable ones quoted inline) are extracted and each is checked by a rule for
its program; a command no rule knows fails the test.

What each rule does (fast, offline; nothing here trains or loads a real model):
- `gmoe-finetune` / `python -m gmoe.finetune` (also after torchrun / accelerate launch): parsed as the
  command line parses it, and its values checked as a job checks them before loading anything
  (`--help`: printed). Commands that would train or score the real model are checked this far only.
- `python -m gmoe.finetune.harness`: parsed by lm-eval's own command line, the model type `gmoe`
  registered, each `--model_args` key one its model class takes, local paths existing, and each task
  one of lm-eval's eight or a packaged one present in `--include_path`.
- `python -m gmoe.finetune.harness_tasks DIR` and `VAR=$(python -c ...)`: run for real (a folder of
  task YAMLs; the base model's location), their results used by the commands after them.
- `python -m benchmarks.X ...` and `python SCRIPT.py ...`: the file exists, compiles, and its argparse
  declares every flag used (read from the source: importing it would load torch); files named
  (`bash X.sh`, config files): exist, and shell scripts pass `bash -n`.
- `pip install`: extras named exist in pyproject.toml, packages named are installed; `make X`: a target.
"""
import contextlib
import glob
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
RUNNABLE_INLINE = ("gmoe-finetune ", "python ", "make ", "bash ", "pip install ")
#: placeholders of the docs -> a value of the same kind
PLACEHOLDERS = {"TASK": "obqa", "TASKS": "arc_challenge,boolq", "N": "2", "OUT_DIR": "out"}
SUBCOMMANDS = ("run", "compare", "eval", "routing")


def _commands(path: str) -> list[tuple[int, list[str]]]:
    """(line, [each shell line of the block]) per ```bash block, and one per runnable inline command."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    out = []
    for m in re.finditer(r"^```(bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", m.group(2))
        lines = [ln for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        out.append((text[:m.start()].count("\n") + 1, lines))
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for m in re.finditer(r"`([^`\n]+)`", prose):
        if m.group(1).startswith(RUNNABLE_INLINE):
            out.append((prose[:m.start()].count("\n") + 1, [m.group(1)]))
    return out


CASES = [(f"{path}:{line}", lines) for path in DOCS for line, lines in _commands(path)]


def test_the_docs_have_commands_to_check():
    assert len(CASES) >= 20 and any("gmoe-finetune.harness" in " ".join(c) or "gmoe.finetune.harness" in " ".join(c)
                                    for _, c in CASES)


@pytest.mark.parametrize("where,lines", CASES, ids=[c[0] for c in CASES])
def test_every_documented_command_works(where, lines, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text("task: obqa\nlr: 1.0e-4\n")
    env = {}
    for line in lines:
        assigned = re.fullmatch(r"\s*([A-Z_]+)=\$\((.*)\)\s*(#.*)?", line)
        if assigned:  # VAR=$(python -c ...): run, and $VAR expanded in the lines after it
            env[assigned.group(1)] = _run_substitution(assigned.group(2), where)
            continue
        argv = shlex.split(line, comments=True)
        while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):  # VAR=value before a command
            argv.pop(0)
        argv = [_expand(a, env) for a in argv if a != "..."]
        if argv:
            _check(argv, where, tmp_path)


def _expand(arg: str, env: dict) -> str:
    for name, value in env.items():
        arg = arg.replace(f"${name}", value)
    return PLACEHOLDERS.get(arg, arg)


def _run_substitution(value: str, where: str) -> str:
    """The output of `$(python -c ...)` (`value`: the command inside). Without the package it locates, the helper must say which pip
    command installs it; the commands after it are then checked with a stand-in value."""
    inner = shlex.split(value)
    assert inner[0] in ("python", "python3") and inner[1] == "-c", f"{where}: only $(python -c ...) is run here"
    out = subprocess.run([sys.executable, *inner[1:]], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if out.returncode != 0 and "pip install --no-deps" in out.stderr:
        return "pretrained=MISSING,gguf_file=MISSING.gguf"
    assert out.returncode == 0 and out.stdout.strip(), f"{where}: {value} failed: {out.stderr[-2000:]}"
    return out.stdout.strip()


def _check(argv: list[str], where: str, tmp_path) -> None:
    prog, rest = argv[0], argv[1:]
    if prog == "gmoe-finetune":
        _check_finetune(rest, where)
    elif prog in ("python", "python3"):
        _check_python(rest, where, tmp_path)
    elif prog == "pip":
        _check_pip(rest, where)
    elif prog == "make":
        makefile = open(os.path.join(ROOT, "Makefile")).read()
        assert all(re.search(rf"^{re.escape(t)}:", makefile, re.M) for t in rest), f"{where}: make {rest}"
    elif prog == "bash":
        _exists(rest[0], where)
        assert subprocess.run(["bash", "-n", os.path.join(ROOT, rest[0])]).returncode == 0, f"{where}: {rest[0]}"
    elif prog == "torchrun":
        from torch.distributed.run import get_args_parser

        _check_launched(get_args_parser().parse_args(rest), where)
    elif prog == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        assert rest[0] == "launch", f"{where}: accelerate {rest[0]}"
        ns = launch_command_parser().parse_args(rest[1:])
        for path in (ns.config_file, ns.deepspeed_config_file):
            if path:
                _exists(path, where)
        _check_launched(ns, where)
    else:
        pytest.fail(f"{where}: no rule checks `{shlex.join(argv)}`; add one to {__file__}")


def _check_launched(ns, where: str) -> None:
    """What a launcher (parsed by its own parser) starts: `-m gmoe.finetune ...` or a script."""
    if ns.module:
        assert ns.training_script == "gmoe.finetune", f"{where}: launches -m {ns.training_script}"
        _check_finetune(ns.training_script_args, where)
    else:
        _exists(ns.training_script, where)


def _exists(path: str, where: str) -> None:
    assert os.path.exists(os.path.join(ROOT, path)), f"{where}: {path} does not exist"


def _check_finetune(args: list[str], where: str) -> None:
    """Parsed as `gmoe-finetune` parses it; values checked as the job checks them before loading anything."""
    from gmoe.finetune import validate
    from gmoe.finetune.cli import main, parse_command, split_command

    if args and args[0] == "SUBCOMMAND":
        for command in SUBCOMMANDS:
            _check_finetune([command, *args[1:]], where)
        return
    args = args or ["--help"]  # the program named alone: its help
    command, rest = split_command(args)
    if command is None or "--help" in rest:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                code = main(args)
            except SystemExit as stop:
                code = stop.code
        assert code == 0 and "usage: gmoe-finetune" in out.getvalue(), where
        return
    if command == "routing":
        from gmoe.finetune.routing import routing_parser

        routing_parser().parse_args_into_dataclasses(rest)
        return
    cfg = parse_command(command, rest)
    for check in (validate.check_budget, validate.check_selection, validate.check_adapter_spec):
        check(cfg)


def _check_python(args: list[str], where: str, tmp_path) -> None:
    if args[0] == "-c":
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 0, f"{where}: {out.stderr[-2000:]}"
    elif args[0] == "-m" and args[1] == "gmoe.finetune":
        _check_finetune(args[2:], where)
    elif args[0] == "-m" and args[1] == "gmoe.finetune.harness":
        _check_lm_eval(args[2:], where, tmp_path)
    elif args[0] == "-m" and args[1] == "gmoe.finetune.harness_tasks":
        from gmoe.finetune.harness_tasks import main

        assert main(args[2:]) == 0, where
    elif args[0] == "-m" and args[1].startswith("benchmarks."):
        _check_declared_flags(args[1].replace(".", "/") + ".py", args[2:], where)
    elif args[0].endswith(".py"):
        _check_declared_flags(args[0], args[1:], where)
    else:
        pytest.fail(f"{where}: no rule checks `python {shlex.join(args)}`")


def _check_declared_flags(path: str, args: list[str], where: str) -> None:
    """A script of this repository (a benchmark, an example): it exists, compiles, and its argparse
    declares every flag the command uses (read from its source: importing it would load torch)."""
    _exists(path, where)
    source = open(os.path.join(ROOT, path), encoding="utf-8").read()
    compile(source, path, "exec")
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"add_argument\([^)]*[\"']{re.escape(flag)}[\"']", source), f"{where}: {path} has no {flag}"


def _check_lm_eval(args: list[str], where: str, tmp_path) -> None:
    """lm-eval's own parser takes the arguments; --model_args and the tasks are checked beside it."""
    pytest.importorskip("lm_eval")
    from lm_eval._cli.harness import HarnessCLI

    from gmoe.finetune import harness
    from gmoe.finetune.harness_model import GMoELM
    from gmoe.finetune.harness_tasks import LM_EVAL_YAML, SUFFIX

    assert harness.register()
    ns = HarnessCLI()._parser.parse_args(["run", *args])
    assert ns.model == "gmoe", where
    model_args = ns.model_args if isinstance(ns.model_args, dict) else \
        dict(kv.split("=", 1) for kv in ns.model_args.split(","))
    takes = set(inspect.signature(GMoELM.__init__).parameters) | set(inspect.signature(
        GMoELM.__mro__[1].__init__).parameters)
    assert set(model_args) <= takes - {"self", "kwargs"}, f"{where}: {set(model_args) - takes}"
    pretrained = model_args["pretrained"]
    if os.path.isabs(pretrained):
        assert os.path.isdir(pretrained), f"{where}: {pretrained}"
        if "gguf_file" in model_args:
            assert os.path.isfile(os.path.join(pretrained, model_args["gguf_file"])), f"{where}"
    include = ns.include_path
    for task in (ns.tasks if isinstance(ns.tasks, list) else ns.tasks.split(",")):
        if task.endswith(SUFFIX):
            assert include and os.path.isfile(os.path.join(tmp_path, include, f"{task}.yaml")), f"{where}: {task}"
        else:
            assert task in LM_EVAL_YAML, f"{where}: {task} is not one of lm-eval's tasks checked here"


def _check_pip(args: list[str], where: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    assert args[0] == "install", where
    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    names = [a for a in args[1:] if not a.startswith("-")]
    for name in names:
        if name.startswith("."):
            for extra in re.findall(r"\[([^\]]+)\]", name):
                assert all(e in extras for e in extra.split(",")), f"{where}: extra {extra} is not in pyproject"
            continue
        package = re.split(r"[=<>\[]", name)[0]
        try:
            installed = version(package)
        except PackageNotFoundError:  # then the project's own installer must name it (make demo installs it)
            assert package in open(os.path.join(ROOT, "Makefile")).read(), f"{where}: {package} is unknown"
            continue
        if "==" in name:
            assert installed.split("+")[0] == name.split("==")[1], f"{where}: {name}, installed {installed}"
