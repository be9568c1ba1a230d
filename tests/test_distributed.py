"""Two ranks on the CPU (gloo): FSDP2 and DDP against one process with the same global batch.

The shipped stories260K model and real pairs, tiny (12 pairs of at most 32 tokens per
objective, 3 steps of mgda-decoupled). One spawn of two processes runs every distributed
case in turn, so the process start and imports are paid once.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config
from sync_guard import forbid_host_sync

from mofast import checkpoint, distributed
from mofast.trainer import Trainer

WORLD = 2
STEPS = 3
MODES = ("fsdp", "ddp")


def _config(cache_dir, output_dir, **overrides):
    values = dict(max_length=32, micro_batch=2, max_steps=STEPS, epochs=2, threads=1)
    values.update(combinator="mgda-decoupled", output_dir=str(output_dir))
    return tiny_config(cache_dir, **{**values, **overrides})


def _fit_recording(trainer: Trainer) -> list[torch.Tensor]:
    """Run `fit` and return every step's device-side record as this rank saw it."""
    records = []
    step = trainer.train_step

    def recording(batches):
        records.append(step(batches).clone())
        return records[-1]

    trainer.train_step = recording
    trainer.fit()
    return records


def _full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    weights, _ = distributed.full_state(trainer.model, None, trainer.context)
    return {name: tensor.detach().clone() for name, tensor in weights.items()}


def _counting_allreduce(calls: list, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls.append(bucket.buffer().numel())
    return allreduce_hook(None, bucket)


def _worker(rank: int, init_file: str, cache_dir: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for mode in MODES:
            run_dir = os.path.join(root, mode)
            trainer = Trainer(_config(cache_dir, run_dir, parallel=mode, save_every=2), run_dir)
            reductions = []
            if mode == "ddp":
                trainer.policy.register_comm_hook(reductions, _counting_allreduce)
            records = _fit_recording(trainer)
            out[mode] = {"records": records, "weights": _full_weights(trainer)}
            out[mode]["reductions"] = len(reductions)

            # One more step, watched: the all-reduce and everything around it stay on the
            # device (what would make a GPU wait is refused on the CPU as well).
            batches = trainer.prepare(trainer.sampler.window(0, 0))
            with forbid_host_sync():
                record = Trainer.train_step(trainer, batches)  # not the recording wrapper
            out[mode]["watched"] = record

        # Resume each run from its step-2 checkpoint (under fsdp gathered on save): the
        # final step's checkpoint goes, as if the run had been killed before writing it.
        out["resumed"] = {}
        for mode in MODES:
            run_dir = os.path.join(root, mode)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(checkpoint.latest_checkpoint(run_dir))
            dist.barrier()
            config = _config(cache_dir, run_dir, parallel=mode, save_every=2)
            resumed = Trainer(config, run_dir, resume=True)
            out["resumed"][mode] = {"step": resumed.step}
            resumed.fit()
            out["resumed"][mode]["weights"] = _full_weights(resumed)

        # A bfloat16 model under fsdp keeps float32 master shards, so float32 buffers work.
        run_dir = os.path.join(root, "master")
        config = _config(
            cache_dir, run_dir, parallel="fsdp", dtype="bfloat16", save_model=True, max_steps=2
        )
        trainer = Trainer(config, run_dir)
        out["master"] = {
            "records": _fit_recording(trainer),
            "dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
            "buffer": str(trainer.buffers.rows.dtype),
        }

        # Gradient buffers in another dtype than the weights' are refused by name.
        out["refused"] = {}
        for mode in MODES:
            run_dir = os.path.join(root, f"bf16-{mode}")
            try:
                Trainer(_config(cache_dir, run_dir, parallel=mode, grad_dtype="bfloat16"), run_dir)
            except ValueError as error:
                out["refused"][mode] = str(error)
        torch.save(out, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process run with the global batch, then the two-rank runs."""
    cache_dir = tmp_path_factory.mktemp("cache")
    root = tmp_path_factory.mktemp("ranks")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_dir = root / "single"
        single = Trainer(_config(cache_dir, single_dir, micro_batch=2 * WORLD), single_dir)
        single_records = _fit_recording(single)
        single_weights = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)

    mp.spawn(
        _worker,
        args=(str(root / "init"), str(cache_dir), str(root)),
        nprocs=WORLD,
        join=True,
    )
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return {"root": root, "records": single_records, "weights": single_weights, "ranks": ranks}


def _assert_close_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, reference in expected.items():
        # The sums run in another order (per-rank means, then the average over ranks); one
        # Adam step of lr 1e-3 moves a weight by up to about 1e-3, so 1e-5 is far below it.
        torch.testing.assert_close(got[name], reference, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_coefficients_are_bit_identical_on_every_rank(runs, mode):
    first, second = (runs["ranks"][r][mode]["records"] for r in range(WORLD))
    assert len(first) == len(second) == STEPS
    for a, b in zip(first, second, strict=True):
        # The whole record: losses, coefficients, Gram matrix, skipped flag, statistics.
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, mode):
    k = 2
    for got, expected in zip(runs["ranks"][0][mode]["records"], runs["records"], strict=True):
        losses, weights = got[:k], got[k : 2 * k]
        torch.testing.assert_close(losses, expected[:k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights, expected[k : 2 * k], rtol=1e-4, atol=1e-5)
        assert not torch.equal(weights, torch.full_like(weights, 1 / k))

    # FSDP gathers the full weights on rank 0 only; DDP holds them on every rank.
    for rank in range(WORLD) if mode == "ddp" else [0]:
        _assert_close_weights(runs["ranks"][rank][mode]["weights"], runs["weights"])


@pytest.mark.parametrize("mode", MODES)
def test_rank_zero_logs_the_bytes_of_the_one_all_reduce(runs, mode):
    k = 2
    lines = (runs["root"] / mode / "metrics.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["step"] for e in entries] == list(range(1, STEPS + 1))

    # fsdp: the k*k partial Gram plus 3k statistics; ddp: the statistics only (float32).
    statistics = 3 * k * 4
    expected = k * k * 4 + statistics if mode == "fsdp" else statistics
    assert all(e["comm_bytes"] == expected for e in entries)

    # Throughput counts the whole global batch, not rank 0's share of it.
    single = (runs["root"] / "single" / "metrics.jsonl").read_text().splitlines()
    assert [e["tokens"] for e in entries] == [json.loads(line)["tokens"] for line in single]
    assert all(math.isfinite(e["losses"][n]) for e in entries for n in e["losses"])


@pytest.mark.parametrize("mode", MODES)
def test_a_distributed_step_does_not_synchronise_with_the_host(runs, mode):
    first, second = (runs["ranks"][r][mode]["watched"] for r in range(WORLD))
    assert torch.equal(first, second) and torch.isfinite(first).all()


def test_ddp_reduces_each_objective_once_per_window(runs):
    # 2 micro-batches per window: no_sync must hold back the first one's reduction (the
    # model fits one bucket, so one all-reduce per objective and step).
    k = 2
    assert runs["ranks"][0]["ddp"]["reductions"] == k * STEPS


@pytest.mark.parametrize("mode", MODES)
def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_weights(runs, mode):
    steps = [runs["ranks"][rank]["resumed"][mode]["step"] for rank in range(WORLD)]
    assert steps == [2] * WORLD
    resumed = runs["ranks"][0]["resumed"][mode]["weights"]
    uninterrupted = runs["ranks"][0][mode]["weights"]
    assert resumed.keys() == uninterrupted.keys() and uninterrupted
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_fsdp_keeps_float32_master_shards_of_a_bfloat16_model(runs):
    first, second = (runs["ranks"][r]["master"] for r in range(WORLD))
    assert first["dtypes"] == ["torch.float32"] and first["buffer"] == "torch.float32"
    assert len(first["records"]) == 2
    for a, b in zip(first["records"], second["records"], strict=True):
        assert torch.equal(a, b) and torch.isfinite(a).all()
    # Step 1 starts at the reference: every loss is ln 2 up to bfloat16 rounding.
    assert torch.allclose(first["records"][0][:2], torch.full((2,), math.log(2)), atol=0.02)

    saved = runs["root"] / "master" / "model" / "model.safetensors"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(saved).values()} == {torch.bfloat16}


@pytest.mark.parametrize("mode", MODES)
def test_buffers_in_another_dtype_than_the_weights_are_refused(runs, mode):
    for rank in range(WORLD):
        assert "grad_dtype" in runs["ranks"][rank]["refused"][mode]


def test_torchrun_launches_the_cli_and_rank_zero_alone_writes_the_run(tmp_path):
    # FSDP with an online reference: a sharded frozen copy runs beside the policy.
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "mofast",
        "train",
        "--parallel",
        "fsdp",
        "--max-pairs",
        "8",
        "--max-length",
        "32",
        "--micro-batch",
        "2",
        "--grad-accum",
        "1",
        "--max-steps",
        "2",
        "--threads",
        "1",
        "--reference",
        "online",
        "--output-dir",
        str(run_dir),
        "--plots",
        "false",
        "--tensorboard",
        "false",
        "--log-every",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == [1, 2]
    assert all(e["comm_bytes"] == (2 * 2 + 3 * 2) * 4 for e in entries)
    assert entries[0]["losses"] == pytest.approx({n: math.log(2) for n in entries[0]["losses"]})
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert "parallel: fsdp" in (run_dir / "config.yaml").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parallel_mode_needs_a_process_group_and_several_ranks_need_a_mode(monkeypatch):
    with pytest.raises(ValueError, match="torchrun"):
        distributed.setup("fsdp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="parallel is 'none'"):
        distributed.setup("none")
    with pytest.raises(ValueError, match="parallel must be one of"):
        distributed.setup("zero3")
