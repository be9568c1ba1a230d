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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny shapes: a second thread only adds waiting, and
    on a loaded machine OpenMP's barriers made a step 10x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(cache_dir, **overrides):
    """A TrainConfig for a few steps on 12 pairs of the embedded data, with the reference
    log-probabilities precomputed into cache_dir, logging every step and writing no plots,
    model or TensorBoard files; overrides replace any field."""
    from mofast.config import from_dict

    values = dict(
        max_pairs=12,
        max_length=48,
        micro_batch=4,
        grad_accum=2,
        lr=1e-3,
        warmup_ratio=0.0,
        reference="precompute",
        cache_dir=str(cache_dir),
        log_every=1,
        plots=False,
        save_model=False,
        tensorboard=False,
    )
    values.update(overrides)
    return from_dict(values)
