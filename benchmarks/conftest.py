"""pytest setup for the micro-benchmarks: `pytest benchmarks --benchmark-only`.

The bench_*.py files are collected here, and only here: `pytest tests` (the project's
testpaths) never loads this folder. Unlike tests/conftest.py, nothing here turns the Triton
interpreter on: the interpreter is never timed (Triton contenders skip without CUDA).
"""
import os

import pytest
import torch

from benchmarks.measure import machine_cores

os.environ.pop("GMOE_BACKEND", None)


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    torch.set_num_threads(machine_cores())


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
