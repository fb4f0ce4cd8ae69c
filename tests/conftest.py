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

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
