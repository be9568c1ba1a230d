"""The trainer's CUDA path, on a GPU only (bench/gpu_check.sh): float32 weights with the
forward under bf16 autocast, fused AdamW reading its lr on the device, and a whole step that
never synchronises with the host. The lent GPU machine lacks `datasets` unless its wheels
were carried (bench/fetch_wheels.sh): then this file is skipped, not an error. A `datasets`
that is there but cannot be imported (a dependency missing) is an error, not a skip."""

import importlib.util
import math

import pytest
import torch
from conftest import requires_cuda, tiny_config

if importlib.util.find_spec("datasets") is None:
    pytest.skip("bench/fetch_wheels.sh brings datasets to a GPU machine", allow_module_level=True)

from mofast.trainer import Trainer  # noqa: E402

LN2 = math.log(2)


@requires_cuda
def test_a_cuda_step_keeps_float32_weights_updates_and_never_syncs(tmp_path):
    config = tiny_config(tmp_path / "cache", device="cuda", max_pairs=24, max_length=64, lr=1e-4)
    trainer = Trainer(config, tmp_path / "run")
    assert (trainer.backend.dtype, trainer.backend.autocast) == (torch.float32, torch.bfloat16)
    assert trainer.lr.is_cuda and trainer.buffers.rows.is_cuda
    before = [p.detach().clone() for p in trainer.buffers.params]

    # The first step compiles the kernels and lets AdamW create its state (torch makes its
    # step counters from Python numbers); the next ones must not wait for the GPU once.
    records = [trainer.train_step(trainer.prepare(trainer.sampler.window(0, 0)))]
    for step in (1, 2):
        batches = trainer.prepare(trainer.sampler.window(0, step))  # host work and copies
        torch.cuda.set_sync_debug_mode("error")
        try:
            records.append(trainer.train_step(batches))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    records = torch.stack(records).cpu()

    # Step 1 starts at the reference: ln 2 up to float32 rounding of the per-row sums of token
    # log-probs, which CUDA's reduction orders by the row's padded length and alignment (the
    # reference table came from batches of another size). Summing T terms errs by at most
    # T * 2^-24 times their absolute sum, in each of the four log-probs of a margin; a wrong
    # reference (e.g. one not computed under the same autocast) is off by orders more.
    k = trainer.k
    largest = max(table.abs().max().item() for table in trainer.reference_table.values())
    bound = config.beta / 2 * 4 * config.max_length * 2**-24 * largest
    assert torch.all((records[0, :k].double() - LN2).abs() <= bound), (records[0, :k], bound)
    assert torch.isfinite(records).all() and not records[:, 2 * k + k * k].any()
    assert trainer.updates.item() == 3
    params = trainer.buffers.params
    assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(p.dtype == torch.float32 for p in params)
