"""Compile Triton kernels for a GPU target on a machine without one.

The interpreter lets through what real compilation refuses (types of loop-carried values,
unsupported ops, spills), so each kernel's tests also lower it to a cubin for sm_90 with
the triton wheel's own compiler, in a fresh process where TRITON_INTERPRET is unset.
"""

import os
import subprocess
import sys

import pytest


def run_without_interpreter(script: str, timeout: float = 300) -> str:
    """Run `script` in a new Python process with real Triton compilation; returns stdout."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # The knob only silences a deprecation warning of Triton 3.9 about its own default.
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
