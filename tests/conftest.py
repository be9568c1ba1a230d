"""Test set-up: the CPU is the default device; Triton runs through its interpreter there.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test
module imports mofast.kernels.

The property tests (hypothesis) draw the same examples on every run, so a CI result can be
reproduced; HYPOTHESIS_PROFILE=explore draws fresh ones (add --hypothesis-seed=N to
replay a run).
"""

import os

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def requires_cuda(test):
    """Mark a GPU-only test: skipped with a reason here, selected by `pytest -m gpu` there."""
    skip = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
