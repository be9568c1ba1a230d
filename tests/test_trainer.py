"""The trainer on the shipped stories260K model and the shipped real UltraFeedback pairs.

Runs are kept tiny (a few pairs of at most 48 tokens) so the file finishes in well under
two minutes on 2 CPU cores; the tokenised pairs and reference log-probs are cached once in a
module-wide folder.
"""

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import tiny_config
from sync_guard import forbid_host_sync

from mofast import config as config_module
from mofast.config import TrainConfig, from_dict
from mofast.trainer import (
    GradientBuffers,
    Trainer,
    build_objectives,
    model_location,
    select_backend,
)

LN2 = math.log(2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trainer(cache_dir, tmp_path_factory):
    return Trainer(tiny_config(cache_dir), tmp_path_factory.mktemp("run"))


def _window(trainer, sizes):
    """Indices 0.. of every objective split into micro-batches of the given sizes."""
    out = {}
    for name in trainer.names:
        start, lists = 0, []
        for size in sizes:
            lists.append(list(range(start, start + size)))
            start += size
        out[name] = lists
    return out


def _params(trainer):
    return [p.detach().clone() for p in trainer.buffers.params]


# ---------------------------------------------------------------------------------------------
# Step 0, micro-batches, host synchronisation, non-finite steps


def test_step_zero_loss_is_ln2_with_precomputed_and_online_reference(trainer, cache_dir, tmp_path):
    stats = trainer.accumulate_gradients(trainer.prepare(trainer.sampler.window(0, 0)))
    losses = stats[:, 0].double()
    assert torch.all((losses - LN2).abs() < 1e-6), losses

    online = Trainer(tiny_config(cache_dir, reference="online"), tmp_path / "online")
    assert online.reference_model is not None and not online.reference_table
    stats = online.accumulate_gradients(online.prepare(online.sampler.window(0, 0)))
    assert torch.all((stats[:, 0].double() - LN2).abs() < 1e-6), stats[:, 0]
    assert online.reference_forwards == 2 * online.config.grad_accum


def test_window_loss_and_gradient_do_not_depend_on_the_micro_batch_split(trainer):
    one = trainer.accumulate_gradients(trainer.prepare(_window(trainer, [8])))
    rows_one = trainer.buffers.rows.clone()
    four = trainer.accumulate_gradients(trainer.prepare(_window(trainer, [2, 2, 2, 2])))
    rows_four = trainer.buffers.rows.clone()

    assert rows_one.abs().amax() > 0
    torch.testing.assert_close(four[:, 0], one[:, 0], rtol=1e-6, atol=1e-6)
    # Same sums in another order: fp32 rounding only, relative to each row's scale.
    scale = rows_one.abs().amax(dim=1, keepdim=True)
    assert torch.all((rows_four - rows_one).abs() <= 1e-5 * scale)

    uneven = trainer.accumulate_gradients(trainer.prepare(_window(trainer, [5, 3])))
    torch.testing.assert_close(uneven[:, 0], one[:, 0], rtol=1e-6, atol=1e-6)
    assert torch.all((trainer.buffers.rows - rows_one).abs() <= 1e-5 * scale)


def test_a_bfloat16_model_keeps_float32_weights_under_autocast(trainer, cache_dir, tmp_path):
    # An AdamW step of lr 1e-7 is far below half the bfloat16 spacing near a weight (~6e-5
    # at 0.02): bfloat16 weights rounded every update of the recipe away. With float32
    # gradient buffers the weights stay float32 and the forward runs under bf16 autocast.
    mixed = Trainer(tiny_config(cache_dir, dtype="bfloat16", lr=1e-7), tmp_path / "mixed")
    assert (mixed.backend.dtype, mixed.backend.autocast) == (torch.float32, torch.bfloat16)
    assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}
    assert not mixed.buffers.uses_hooks

    # The forward really computes in bfloat16: near the float32 log-probs, not equal to them.
    batch = trainer.prepare(trainer.sampler.window(0, 0))[0][0]
    with torch.no_grad():
        full = trainer._logps(trainer.model, batch)
        half = mixed._logps(mixed.model, batch)
    assert not torch.equal(half, full)
    torch.testing.assert_close(half, full, rtol=2e-2, atol=0.0)

    # Step 1 starts at the reference (ln 2 exactly: both sides run the same autocast forward),
    # and the update of about lr reaches the weights.
    before = _params(mixed)
    record = mixed.train_step(mixed.prepare(mixed.sampler.window(0, 0)))
    assert torch.all((record[: mixed.k].double() - LN2).abs() < 1e-6), record[: mixed.k]
    moved = max((p - b).abs().max().item() for p, b in zip(_params(mixed), before, strict=True))
    assert 1e-8 < moved < 1e-6

    # Explicit bfloat16 buffers keep bfloat16 weights (pure bfloat16 training, no autocast).
    pure = select_backend("cpu", dtype="bfloat16", float32_master=False)
    assert (pure.dtype, pure.autocast) == (torch.bfloat16, None)


def test_parameter_grads_are_views_of_the_buffers(trainer):
    batches = trainer.prepare(trainer.sampler.window(0, 0))
    rows = trainer.buffers.rows
    trainer.accumulate_gradients(batches)
    assert not trainer.buffers.uses_hooks
    for p in trainer.buffers.params:
        assert p.grad is not None
        base = p.grad.untyped_storage().data_ptr()
        assert base == trainer.buffers.flat.untyped_storage().data_ptr()
    assert rows.abs().sum(dim=1).min() > 0, "every objective's row received its gradient"


def test_a_step_does_not_synchronise_with_the_host(trainer):
    batches = trainer.prepare(trainer.sampler.window(0, 1))
    before = _params(trainer)
    with forbid_host_sync():
        record = trainer.train_step(batches)
    assert record.dim() == 1 and torch.isfinite(record).all()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.buffers.params, strict=True))


def test_a_non_finite_loss_skips_the_update_on_the_device(trainer):
    trainer.train_step(trainer.prepare(trainer.sampler.window(0, 0)))  # optimiser state exists
    weights = _params(trainer)
    state = {
        i: {k: v.clone() for k, v in trainer.optimizer.state[p].items()}
        for i, p in enumerate(trainer.buffers.params)
    }
    skipped_before = trainer.skipped_total

    batches = trainer.prepare(trainer.sampler.window(0, 1))
    batches[1][0].reference[0] = float("nan")
    with forbid_host_sync():
        record = trainer.train_step(batches)
    trainer._pending.append((999, 1, record))
    entry = trainer.flush_metrics()[-1]

    assert entry["skipped"] and trainer.skipped_total == skipped_before + 1
    assert math.isnan(entry["losses"][trainer.names[1]])
    for before, p in zip(weights, trainer.buffers.params, strict=True):
        assert torch.equal(before, p)
    for i, p in enumerate(trainer.buffers.params):
        for key, value in trainer.optimizer.state[p].items():
            assert torch.equal(value, state[i][key]), key

    # The next finite step updates again (at a non-zero lr: this shared fixture's short
    # cosine schedule may already have reached its end).
    trainer.lr.fill_(trainer.config.lr)
    record = trainer.train_step(trainer.prepare(trainer.sampler.window(0, 0)))
    k = trainer.k
    assert record[2 * k + k * k] == 0, "the skip flag of the record"
    assert any(not torch.equal(a, p) for a, p in zip(weights, trainer.buffers.params, strict=True))


def test_a_non_finite_gradient_with_finite_losses_skips_the_update(trainer):
    trainer.train_step(trainer.prepare(trainer.sampler.window(0, 0)))  # optimiser state exists
    trainer.lr.fill_(trainer.config.lr)
    updates = trainer.updates.clone()
    weights = _params(trainer)
    state = [
        {k: v.clone() for k, v in trainer.optimizer.state[p].items()}
        for p in trainer.buffers.params
    ]

    stats = trainer.accumulate_gradients(trainer.prepare(trainer.sampler.window(0, 1)))
    assert torch.isfinite(stats).all()
    trainer.buffers.rows[1, 7] = float("inf")
    with forbid_host_sync():
        record = trainer.apply_update(stats[:, 0], stats[:, 1:])

    k = trainer.k
    assert record[2 * k + k * k] == 1, "the skip flag of the record"
    for before, p in zip(weights, trainer.buffers.params, strict=True):
        assert torch.equal(before, p)
    for before, p in zip(state, trainer.buffers.params, strict=True):
        for key, value in trainer.optimizer.state[p].items():
            assert torch.equal(value, before[key]), key

    # The lr schedule stays where it was too (it counts applied updates only), and an
    # applied update moves it on by one.
    def schedule(count):
        return (trainer.config.lr * trainer.lr_factor(count)).float()

    assert torch.equal(trainer.updates, updates) and torch.equal(trainer.lr, schedule(updates))
    trainer.train_step(trainer.prepare(trainer.sampler.window(0, 0)))
    assert trainer.updates == updates + 1 and torch.equal(trainer.lr, schedule(updates + 1))


def test_bfloat16_buffers_accumulate_through_hooks(cache_dir, tmp_path):
    fp32 = Trainer(tiny_config(cache_dir), tmp_path / "fp32")
    bf16 = Trainer(tiny_config(cache_dir, grad_dtype="bfloat16"), tmp_path / "bf16")
    assert bf16.buffers.uses_hooks and bf16.buffers.rows.dtype == torch.bfloat16
    assert bf16.buffers.flat.dtype == torch.float32

    window = fp32.sampler.window(0, 0)
    expected = fp32.accumulate_gradients(fp32.prepare(window))
    got = bf16.accumulate_gradients(bf16.prepare(window))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # losses: same forward

    # Two micro-batches accumulated in bf16: a few bf16 roundings of each element.
    rows, reference = bf16.buffers.rows.float(), fp32.buffers.rows
    scale = reference.abs().amax(dim=1, keepdim=True)
    assert torch.all((rows - reference).abs() <= 2**-6 * scale)
    assert all(p.grad is not None for p in bf16.buffers.params)

    record = bf16.apply_update(got[:, 0])
    k = bf16.k
    assert record[2 * k + k * k] == 0 and torch.isfinite(record).all()


# ---------------------------------------------------------------------------------------------
# Gradient buffers, backend selection, configuration


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16])
def test_gradient_buffers_accumulate_each_objective_into_its_row(buffer_dtype):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    params = list(model.parameters())
    buffers = GradientBuffers(params, k=3, dtype=buffer_dtype)
    assert buffers.uses_hooks == (buffer_dtype != torch.float32)
    # The flat gradient is row 0 itself when the dtypes agree, its own fp32 buffer otherwise.
    flat_bytes = 0 if buffer_dtype == torch.float32 else 4 * buffers.numel
    assert buffers.nbytes == 3 * buffers.numel * buffer_dtype.itemsize + flat_bytes
    assert buffers.shares_row0 == (buffer_dtype == torch.float32)

    inputs = [torch.randn(2, 9, 7) for _ in range(3)]
    buffers.zero_()
    for i, x in enumerate(inputs):
        buffers.accumulate_into(i)
        for micro in x:  # two backward passes accumulate
            model(micro).pow(2).sum().backward()
    buffers.point_at_flat()

    for i, x in enumerate(inputs):
        expected = torch.autograd.grad(model(x.reshape(-1, 7)).pow(2).sum(), params)
        flat = torch.cat([g.reshape(-1) for g in expected])
        tol = 1e-5 if buffer_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(buffers.rows[i].float(), flat, rtol=tol, atol=tol)
    for p in params:
        assert p.grad.untyped_storage().data_ptr() == buffers.flat.untyped_storage().data_ptr()
    buffers.remove_hooks()


def test_select_backend_picks_per_device():
    liger_types = frozenset({"llama", "qwen2"})
    cpu = select_backend("cpu", flash_attn_installed=True, liger_model_types=liger_types,
                         model_type="llama")  # fmt: skip
    assert (cpu.dtype, cpu.attn_implementation, cpu.liger) == (
        torch.float32,
        "mofast_causal_sdpa",
        False,
    )

    cuda = select_backend("cuda", flash_attn_installed=True, liger_model_types=liger_types,
                          model_type="qwen2")  # fmt: skip
    assert (cuda.dtype, cuda.attn_implementation, cuda.liger) == (
        torch.bfloat16,
        "mofast_causal_flash_attention_2",
        True,
    )

    no_flash = select_backend("cuda", model_type="gpt2", liger_model_types=liger_types)
    assert no_flash.attn_implementation == "mofast_causal_sdpa" and not no_flash.liger

    softcap = select_backend("cuda", model_type="gemma2", attn_softcap=True)
    assert softcap.attn_implementation == "eager"
    assert select_backend("cpu", dtype="bfloat16").dtype == torch.bfloat16
    master = select_backend("cuda", float32_master=True)
    assert (master.dtype, master.autocast) == (torch.float32, torch.bfloat16)
    assert select_backend("cpu", float32_master=True).autocast is None
    assert not select_backend("cuda", liger="off", model_type="llama",
                              liger_model_types=liger_types).liger  # fmt: skip

    with pytest.raises(ValueError, match="CUDA"):
        select_backend("cpu", attn_implementation="flash_attention_2", flash_attn_installed=True)
    with pytest.raises(ValueError, match="not installed"):
        select_backend("cuda", attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="does not patch"):
        select_backend("cuda", liger="on", model_type="gpt2", liger_model_types=liger_types)
    with pytest.raises(ValueError, match="soft-cap"):
        select_backend("cuda", attn_implementation="sdpa", attn_softcap=True)


def test_config_yaml_round_trip_and_command_line_overrides(tmp_path):
    import argparse

    for name in ("default", "qwen2.5-0.5b-ultrafeedback"):
        shipped = config_module.load_yaml(name)
        config_module.dump_yaml(shipped, tmp_path / f"{name}.yaml")
        assert config_module.load_yaml(tmp_path / f"{name}.yaml") == shipped
    recipe = config_module.load_yaml("qwen2.5-0.5b-ultrafeedback")
    assert (recipe.lr, recipe.beta, recipe.micro_batch, recipe.grad_accum) == (1e-7, 0.5, 8, 4)
    assert recipe.model == "Qwen/Qwen2.5-0.5B-Instruct"

    parser = argparse.ArgumentParser()
    config_module.add_field_arguments(parser)
    args = parser.parse_args(
        ["--lr", "3e-6", "--liger", "off", "--max-steps", "5", "--objectives", "{a: x.jsonl}",
         "--data-mode", "pairs", "--dataset", "null", "--model", "null", "--plots", "false"]
    )  # fmt: skip
    config = from_dict(config_module.overrides_from_args(args), recipe)
    assert config.lr == 3e-6 and config.liger == "off" and config.max_steps == 5
    assert config.objectives == {"a": "x.jsonl"} and config.model is None and not config.plots
    assert config.micro_batch == 8  # untouched fields keep the file's value

    flags = {a.dest for a in parser._actions}
    assert {f for f in TrainConfig.__dataclass_fields__} <= flags

    with pytest.raises(ValueError, match="unknown config fields: nope"):
        from_dict({"nope": 1})
    with pytest.raises(ValueError, match="grad_dtype"):
        from_dict({"grad_dtype": "float16"})
    with pytest.raises(ValueError, match="max_steps expects an integer or null, got 'many'"):
        from_dict({"max_steps": "many"})
    with pytest.raises(ValueError, match="lr expects a number, got 'abc'"):
        from_dict({"lr": "abc"})
    with pytest.raises(ValueError, match=r"^lr must be >= 0, got -1.0$"):
        from_dict({"lr": -1})
    with pytest.raises(ValueError, match=r"^beta must be > 0, got 0.0$"):
        from_dict({"beta": 0.0})


def test_config_refuses_empty_or_non_text_objectives():
    # {a: null} became the path "None" (then looked up on the hub); {} failed only after
    # the model had loaded.
    with pytest.raises(ValueError, match="objectives expects"):
        from_dict({"objectives": {"a": None}})
    with pytest.raises(ValueError, match="objectives expects"):
        from_dict({"objectives": {"a": ["x.jsonl"]}})
    with pytest.raises(ValueError, match="objectives must name at least one"):
        from_dict({"objectives": {}})
    assert from_dict({"objectives": {"a": "x.jsonl", 2: "y.parquet"}}).objectives == {
        "a": "x.jsonl",
        "2": "y.parquet",
    }


def test_config_refuses_data_fields_its_mode_does_not_read():
    # Both used to be ignored without a word: the run trained on other data than asked for.
    with pytest.raises(ValueError, match="objectives is read only with data_mode 'pairs'"):
        from_dict({"data_mode": "cdpo", "dataset": "uf.jsonl", "objectives": {"a": "x.jsonl"}})
    with pytest.raises(ValueError, match="dataset is read only with data_mode"):
        from_dict({"dataset": "uf.jsonl"})
    assert from_dict({"data_mode": "ultrafeedback", "dataset": "uf.jsonl"}).objectives is None


@pytest.mark.parametrize("name", ["lr", "beta", "eta", "solver_tol", "eps"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_config_refuses_non_finite_numbers(name, value):
    # A NaN beta or lr passed the sign checks (comparisons with NaN are false) and every
    # step was then skipped as non-finite.
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        from_dict({name: value})


def test_bad_input_leaves_no_run_folder(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        Trainer(tiny_config(cache_dir, objectives={"a": str(missing)}), run_dir)
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------
# Reference cache, data modes, outputs


def test_reference_log_probs_are_cached_and_reused(tmp_path):
    cache = tmp_path / "fresh-cache"
    first = Trainer(tiny_config(cache, max_pairs=6), tmp_path / "a")
    assert first.reference_forwards > 0
    second = Trainer(tiny_config(cache, max_pairs=6), tmp_path / "b")
    assert second.reference_forwards == 0
    for name in first.names:
        assert torch.equal(first.reference_table[name], second.reference_table[name])

    other_data = Trainer(tiny_config(cache, max_pairs=5), tmp_path / "c")
    assert other_data.reference_forwards > 0, "other tokenised data is another cache entry"
    # Another attention implementation gives other rounding: a table from one would move
    # the step-0 losses of the other off ln 2.
    eager = Trainer(tiny_config(cache, max_pairs=6, attn_implementation="eager"), tmp_path / "d")
    assert eager.reference_forwards > 0, "another attention implementation, another entry"


def test_auto_reference_uses_the_cache_or_the_cheaper_way(trainer, cache_dir, tmp_path):
    short = dict(reference="auto", max_steps=1, micro_batch=2, grad_accum=1)
    # The module's cache holds this data's tables: loaded, no forward pass.
    cached = Trainer(tiny_config(cache_dir, **short), tmp_path / "cached")
    assert cached.reference_mode == "precompute" and cached.reference_forwards == 0
    for name in trainer.names:
        assert torch.equal(cached.reference_table[name], trainer.reference_table[name])

    # No cache, and one step reads 4 pairs of 24: a frozen copy computes them online.
    fresh = Trainer(tiny_config(tmp_path / "empty-cache", **short), tmp_path / "fresh")
    assert fresh.reference_mode == "online" and fresh.reference_model is not None
    assert fresh.reference_forwards == 0 and not fresh.reference_table


def _ultrafeedback_record(prompt, ratings, texts):
    aspects = ("helpfulness", "honesty", "instruction_following", "truthfulness")
    return {
        "instruction": prompt,
        "completions": [
            {
                "response": text,
                "annotations": {a: {"Rating": str(r)} for a, r in zip(aspects, row, strict=True)},
            }
            for row, text in zip(ratings, texts, strict=True)
        ],
    }


def test_a_bad_ultrafeedback_record_is_named_with_its_file(tmp_path, cache_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "Q?", "completions": ["a", "b"]}) + "\n")
    config = tiny_config(cache_dir, data_mode="cdpo", dataset=str(path))
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 0: 'completions' must be"):
        build_objectives(config, tokenizer=None)


def test_cdpo_mode_trains_one_objective_on_summed_scores(tmp_path, cache_dir):
    records = [
        _ultrafeedback_record(
            f"Tell a short story about a {animal}.",
            [[5, 5, 4, 5], [2, 3, 2, 1], [4, 4, 4, 4], [1, 1, 2, 1]],
            [f"The {animal} ran home.", f"A {animal} sat.", f"Once a {animal} was glad.", "No."],
        )
        for animal in ("cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen")
    ]
    path = tmp_path / "uf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    config = tiny_config(
        cache_dir, data_mode="cdpo", dataset=str(path), max_pairs=None, max_steps=2,
        test_fraction=0.25, micro_batch=2, grad_accum=2,
    )  # fmt: skip
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.names == ["cdpo"]
    assert len(trainer.datasets["cdpo"]) == 6 * 6  # 6 train prompts x 6 untied pairs
    trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["weights"] == {"cdpo": 1.0} and abs(first["losses"]["cdpo"] - LN2) < 1e-6


def test_ultrafeedback_mode_builds_one_objective_per_aspect(tmp_path, cache_dir):
    from transformers import AutoTokenizer

    from mofast.assets import STORIES260K

    ratings = [[5, "N/A", 4, 5], [2, 3, 2, 1], [4, 4, 4, 4], [1, 1, 2, 1]]
    texts = ["Red.", "Blue.", "Green!", "Ok"]
    records = [_ultrafeedback_record(f"Name a colour ({i}).", ratings, texts) for i in range(8)]
    path = tmp_path / "uf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    config = tiny_config(cache_dir, data_mode="ultrafeedback", dataset=str(path), max_pairs=None,
                  test_fraction=0.25)  # fmt: skip
    datasets, drops = build_objectives(config, AutoTokenizer.from_pretrained(STORIES260K))
    assert list(datasets) == ["helpfulness", "honesty", "instruction_following", "truthfulness"]
    # 6 train prompts of 8. Honesty: an "N/A" takes one completion out of its 3 pairs;
    # instruction following: two tied pairs of 6.
    assert len(datasets["helpfulness"]) == 6 * 6
    assert len(datasets["honesty"]) == 6 * 3 and drops["honesty"]["missing_rating"] == 8 * 3
    assert len(datasets["instruction_following"]) == 6 * 4
    assert drops["instruction_following"]["tie"] == 8 * 2


def test_model_location_of_folders_hub_ids_and_gguf_files(tmp_path):
    from mofast.assets import STORIES260K

    assert model_location(None) == (str(STORIES260K), {})
    assert model_location("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", {})
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_location(str(gguf)) == (str(tmp_path), {"gguf_file": "m.Q4_1.gguf"})
    with pytest.raises(FileNotFoundError, match="GGUF"):
        model_location(str(tmp_path / "missing.gguf"))


def test_model_location_of_home_paths_shipped_names_and_missing_folders(tmp_path, monkeypatch):
    from mofast.assets import STORIES260K

    # `~` was not expanded for a GGUF file ("not found" for a file that was there).
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert model_location("~/m.gguf") == (str(tmp_path), {"gguf_file": "m.gguf"})
    assert model_location("stories260K") == (str(STORIES260K), {})

    # A missing folder under a local one was taken for a hub id and ended in a download error;
    # a missing path of any shape is named, without a network call.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in ("/no/such/model", "./x", "~/nothere", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no model folder at"):
            model_location(missing)
    assert model_location("runs") == ("runs", {})


def test_a_hub_id_beside_a_folder_of_its_namespace_and_a_shadowed_shipped_name(
    tmp_path, monkeypatch
):
    from mofast.trainer import _pretrained

    # A folder named like a hub namespace (`Qwen`, e.g. from a download) made every id of
    # that namespace a "missing folder", the README's own example included.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen").mkdir()
    (tmp_path / "runs").mkdir()
    hub_id = "Qwen/Qwen2.5-0.5B-Instruct"
    assert model_location(hub_id) == (hub_id, {})

    def hub(location, **kwargs):
        if location != hub_id:
            raise OSError(f"{location} is not a valid model identifier\nmore detail")
        return location, kwargs

    assert _pretrained(hub, hub_id, dtype="x") == (hub_id, {"dtype": "x"})
    # A typo under a local folder that the hub does not know either names the folder.
    with pytest.raises(FileNotFoundError, match=r"no model folder at runs/nothere \(runs is"):
        _pretrained(hub, "runs/nothere")
    with pytest.raises(OSError, match="nobody/nothing is not a valid") as error:
        _pretrained(hub, "nobody/nothing")
    assert type(error.value) is OSError, "an id under no local folder fails as the hub says"

    # A local folder without a model that has a shipped model's name (a run folder called
    # stories260K) was loaded instead of the shipped model and failed inside transformers.
    (tmp_path / "stories260K").mkdir()
    with pytest.raises(FileNotFoundError, match="shadows the shipped model stories260K"):
        model_location("stories260K")


def test_fit_writes_metrics_plots_tensorboard_and_the_final_model(tmp_path, cache_dir):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    config = tiny_config(cache_dir, combinator="groupdro", epochs=2, max_steps=3, plots=True,
                  save_model=True, tensorboard=True)  # fmt: skip
    trainer = Trainer(config, run)
    trainer.fit()

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(r["losses"]) == set(r["weights"]) == set(trainer.names)
        assert r["skipped"] is False and r["tokens_per_s"] > 0
        assert abs(sum(r["weights"].values()) - 1) < 1e-5
    assert all(abs(v - LN2) < 1e-6 for v in records[0]["losses"].values())
    assert records[-1]["losses"] != records[0]["losses"]

    assert yaml.safe_load((run / "config.yaml").read_text())["combinator"] == "groupdro"
    for name in ("losses.png", "weights.png", "gram_cosines.png"):
        assert (run / "plots" / name).stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    saved = load_file(run / "model" / "model.safetensors")
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(saved[key], value), key
    assert (run / "model" / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------
# Checkpoints: a run killed with SIGKILL and resumed ends where an uninterrupted run ends


def _train_command(run_dir, cache, *extra):
    return [
        sys.executable, "-m", "mofast", "--log-level", "WARNING", "train",
        "--max-pairs", "12", "--max-length", "40", "--micro-batch", "2", "--grad-accum", "2",
        "--combinator", "groupdro", "--lr", "1e-3", "--warmup-ratio", "0.2",
        "--epochs", "4", "--max-steps", "10", "--save-every", "1",
        "--keep-checkpoints", "2", "--log-every", "1", "--plots", "false",
        "--save-model", "false", "--tensorboard", "false",
        "--cache-dir", str(cache), "--output-dir", str(run_dir), *extra,
    ]  # fmt: skip


def test_sigkill_and_resume_end_with_the_weights_of_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    # Separate caches: the two runs start at once and must not share half-written files.
    full = subprocess.Popen(_train_command(full_dir, tmp_path / "c1"), cwd=tmp_path, env=env)
    victim = subprocess.Popen(_train_command(killed_dir, tmp_path / "c2"), cwd=tmp_path, env=env)

    deadline = time.time() + 120
    while not (killed_dir / "checkpoints" / "step-00000003").exists():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    steps = sorted(p.name for p in (killed_dir / "checkpoints").iterdir())
    assert "step-00000010" not in steps

    resume = [sys.executable, "-m", "mofast", "train", "--resume", str(killed_dir)]
    resumed = subprocess.run(
        resume, cwd=tmp_path, env=env, timeout=300, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # It continued from a checkpoint of the killed run rather than starting over.
    at = int(resumed.stderr.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 3 <= at < 10
    assert f"trained {10 - at} steps" in resumed.stderr
    assert full.wait(timeout=300) == 0

    a = load_file(full_dir / "checkpoints" / "step-00000010" / "model.safetensors")
    b = load_file(killed_dir / "checkpoints" / "step-00000010" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def steps_of(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["losses"], r["weights"]) for r in map(json.loads, lines)]

    assert steps_of(full_dir) == steps_of(killed_dir)


def test_max_steps_replaces_the_epochs(cache_dir, tmp_path):
    # It only capped them: --max-steps 100 on a 72-step config ran 72 steps without a word.
    trainer = Trainer(tiny_config(cache_dir, epochs=1, max_steps=5, log_every=5), tmp_path / "run")
    assert trainer.sampler.steps_per_epoch == 2 and trainer.total_steps == 5
    trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert (trainer.sampler.epoch, trainer.sampler.step) == (2, 1)


def test_objectives_smaller_than_a_step_are_said_to_repeat(cache_dir, tmp_path, caplog):
    # 6 pairs an objective against 8 drawn a step: the sampler repeats pairs within the step.
    caplog.set_level(logging.WARNING, logger="mofast.trainer")
    Trainer(tiny_config(cache_dir, max_pairs=6, max_steps=1), tmp_path / "small").fit()
    (warning,) = [r.getMessage() for r in caplog.records if "a step draws" in r.getMessage()]
    assert re.fullmatch(
        r"\w+ has [1-6], \w+ has [1-6]: fewer pairs than a step draws \(8 per objective\), "
        r"so a step repeats them",
        warning,
    ), warning

    caplog.clear()
    Trainer(tiny_config(cache_dir, max_steps=1), tmp_path / "enough").fit()
    assert not [r for r in caplog.records if "a step draws" in r.getMessage()]


def test_resume_drops_a_half_written_metrics_line(cache_dir, tmp_path):
    # A kill while metrics.jsonl is appended (the buffered lines go out in several writes)
    # leaves a cut last line; it belongs to steps after the checkpoint and must not stop
    # the resume.
    run_dir = tmp_path / "run"
    Trainer(tiny_config(cache_dir, max_steps=1), run_dir).fit()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "losses": {"overall_sc')

    resumed = Trainer(tiny_config(cache_dir, max_steps=2), run_dir, resume=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert resumed.step == 1 and [json.loads(line)["step"] for line in lines] == [1]


def test_a_skipped_step_before_a_checkpoint_resumes_exactly_on_its_schedule(
    cache_dir, tmp_path, monkeypatch
):
    # Step 2's loss is NaN: it is skipped, the schedule (warm-up included) does not advance,
    # and a run stopped at the step-3 checkpoint and resumed ends with the uninterrupted
    # run's weights and logs the same lr per step, each the schedule at the applied updates.
    accumulate = Trainer.accumulate_gradients

    def nan_at_step_2(self, batches):
        stats = accumulate(self, batches)
        return stats.index_fill(1, torch.tensor([0]), math.nan) if self.step == 1 else stats

    monkeypatch.setattr(Trainer, "accumulate_gradients", nan_at_step_2)
    config = tiny_config(cache_dir, micro_batch=2, epochs=2, warmup_ratio=0.2, save_every=3)
    full = Trainer(config, tmp_path / "full")
    full.fit()
    stopped = Trainer(config, tmp_path / "stopped")
    stopped.total_steps = 3
    stopped.fit()
    resumed = Trainer(config, tmp_path / "stopped", resume=True)
    assert resumed.step == 3 and resumed.updates == 2
    resumed.fit()

    def entries(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    logged = entries(tmp_path / "full")
    assert logged == [
        {**e, "tokens_per_s": f["tokens_per_s"]}
        for e, f in zip(entries(tmp_path / "stopped"), logged, strict=True)
    ]
    assert [e["skipped"] for e in logged] == [i == 1 for i in range(full.total_steps)]
    updates = [0, 1, 1] + list(range(2, full.total_steps - 1))
    assert [e["lr"] for e in logged] == [
        (config.lr * full.lr_factor(u)).float().item() for u in updates
    ]
    assert full.updates == resumed.updates == full.total_steps - 1
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_without_the_update_count_is_refused_by_name(cache_dir, tmp_path):
    # A checkpoint from before the lr schedule counted applied updates holds a LambdaLR
    # state instead: resuming it ended in a bare KeyError traceback.
    run_dir = tmp_path / "run"
    Trainer(tiny_config(cache_dir, max_steps=1), run_dir).fit()
    state_file = run_dir / "checkpoints" / "step-00000001" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["scheduler"] = {"last_epoch": int(state.pop("updates"))}
    torch.save(state, state_file)

    with pytest.raises(ValueError, match=r"step-00000001 lacks updates: another version"):
        Trainer(tiny_config(cache_dir, max_steps=2), run_dir, resume=True)


def test_resume_keeps_the_checkpointed_steps_tensorboard_scalars(cache_dir, tmp_path):
    # The writer purges the events from its purge_step on; the checkpoint's own step was
    # logged before the checkpoint and is not redone, so it must survive the resume.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    Trainer(tiny_config(cache_dir, max_steps=2, epochs=4, tensorboard=True), run_dir).fit()
    Trainer(
        tiny_config(cache_dir, max_steps=3, epochs=4, tensorboard=True), run_dir, resume=True
    ).fit()

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for name in ("overall_score", "rubric_mean"):
        assert [e.step for e in events.Scalars(f"losses/{name}")] == [1, 2, 3]


def test_checkpoints_are_atomic_pruned_and_skip_leftover_temporary_folders(tmp_path):
    from mofast import checkpoint

    model = torch.nn.Linear(3, 5)
    # What a run killed while writing step 7 leaves: a temporary folder, never a step-7.
    leftover = checkpoint.checkpoint_dir(tmp_path) / ".tmp-step-00000007-12345"
    leftover.mkdir(parents=True)
    (leftover / "state.pt").write_bytes(b"half")
    assert checkpoint.latest_checkpoint(tmp_path) is None

    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        checkpoint.save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    assert not leftover.exists(), "the next save removes what a killed run left"
    found = checkpoint.list_checkpoints(tmp_path)
    assert [step for step, _ in found] == [2, 3]
    assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == [
        "step-00000002",
        "step-00000003",
    ]

    fresh = torch.nn.Linear(3, 5)
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path), fresh)
    assert state == {"step": 3} and torch.equal(fresh.weight, torch.full((5, 3), 3.0))
    with pytest.raises(FileNotFoundError, match="not a complete mofast checkpoint"):
        checkpoint.load_checkpoint(leftover, fresh)
    with pytest.raises(ValueError, match="keep must be at least 1"):
        checkpoint.save_checkpoint(tmp_path, 4, model, {}, keep=0)


def test_schedule_warms_up_from_above_zero_and_ends_at_zero():
    from mofast.trainer import cosine_with_warmup

    factor = cosine_with_warmup(0.03, 100)  # 3 warm-up steps
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    on_device = factor(torch.tensor([0.0, 2.0, 50.0, 120.0], dtype=torch.float64))
    assert torch.equal(on_device, torch.stack([factor(s) for s in (0, 2, 50, 120)]))
    assert 0 < factor(99) < 1e-3 and factor(100) == 0.0 and factor(150) == 0.0
    values = [factor(s) for s in range(3, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False)), "decays monotonically"
    assert cosine_with_warmup(0.03, 3)(0) == 0.5, "a 3-step run trains from its first step"
