"""Test setup shared by every test file.

TRITON_INTERPRET=1 must be set before any @triton.jit function is defined, so it is set
here, at collection time, before gmoe_kernels.triton is imported. Model-level tests use the
reference backend (backend="auto" never picks the interpreter); kernel tests ask for
backend="triton" explicitly.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("GMOE_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny shapes: one thread per test process (pytest -n 2 runs two); more threads only
# oversubscribe the 2 cores, and small index_add_ calls slow down ~1000x under contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
