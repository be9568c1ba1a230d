"""End-to-end step time of every combinator at k = 4 against `uniform`, through the Trainer.

    python bench/bench_e2e.py [--quick] [--device cpu|cuda] [--layers 2] [--max-length 128]
                              [--pairs 1] [--repeats 3]

The model is a randomly initialised Qwen2.5-0.5B-Instruct-shaped network (hidden 896, 14
heads, 2 KV heads, intermediate 4864, vocabulary 151,936, tied embeddings) cut to `--layers`
layers; the tokenizer is the Qwen2 one shipped in bench/assets/qwen2-tokenizer. The four
objectives are the shipped real UltraFeedback pairs of mofast.data.default_objectives(),
each of its two datasets dealt into two halves (even and odd positions): overall_score/0,
overall_score/1, rubric_mean/0, rubric_mean/1. Every combinator runs the same optimiser step
on the same micro-batches of the same model.

The Trainer is driven through its step functions: `accumulate_gradients` (k forward and
backward passes into the [k, P] buffer) then `apply_update` (gram -> combinator -> combine ->
fused AdamW). The combinators take turns round by round (the order rotates), so a change in
the machine's load reaches all of them alike. Before timing: the step-0 loss of every
objective must be ln 2 (policy = reference), and the Gram matrix and combined gradient of
every combinator must match a float64 reference on the real gradients.

Times are the best of the repeats (on a shared machine contention only adds time; the
medians are kept beside them). Printed last: each combinator's step time over uniform's,
measured whole and with the forward/backward time shared (the best over all combinators,
since that part of the step does not depend on the combinator, so only the update differs),
and the combine step (gram + solve + combine) as a share of the step. Rows go to
bench/results/e2e.csv with the 1-minute load average.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_rows, bench_parser, device_description, format_table  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "qwen2-tokenizer"
COMBINATORS = ("uniform", "groupdro", "mgda", "mgda-normalised", "mgda-decoupled")
LN2 = math.log(2)
# Columns per step of the float64 references, to bound their memory.
REF_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------
# Model, data and trainer shared by the end-to-end benchmarks (bench_trl.py imports these)


def qwen_config(layers: int):
    """Qwen2.5-0.5B-Instruct's configuration with `layers` decoder layers (no download)."""
    from transformers import Qwen2Config

    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    return Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32_768,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=151_643,
        eos_token_id=151_645,
        pad_token_id=151_643,
    )


def write_model(folder: Path, layers: int, seed: int = 0) -> int:
    """Save a randomly initialised model of `qwen_config(layers)` to `folder`; its size."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen_config(layers))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return params


def write_objectives(folder: Path, k: int) -> dict[str, str]:
    """k JSONL files of real pairs dealt from the shipped datasets; {objective: path}."""
    from mofast import data

    sources = data.default_objectives()
    parts = -(-k // len(sources))
    folder.mkdir(parents=True, exist_ok=True)

    files = {}
    for name, pairs in sources.items():
        for part in range(parts):
            if len(files) == k:
                break
            label = name if parts == 1 else f"{name}/{part}"
            path = folder / f"{name}-{part}.jsonl"
            with path.open("w") as f:
                for pair in pairs[part::parts]:
                    f.write(json.dumps(pair) + "\n")
            files[label] = str(path)
    return files


def make_trainer(
    workdir: Path,
    objectives: dict[str, str],
    *,
    device: str,
    max_length: int,
    pairs: int,
    combinator: str = "uniform",
):
    """A Trainer on the saved model whose window is `pairs` pairs per objective, one
    micro-batch, with the reference log-probs precomputed for exactly those pairs."""
    from mofast.config import from_dict
    from mofast.trainer import Trainer

    config = from_dict(
        {
            "model": str(workdir / "model"),
            "tokenizer": str(TOKENIZER_DIR),
            "device": device,
            "objectives": objectives,
            "max_length": max_length,
            "max_pairs": pairs,
            "micro_batch": pairs,
            "grad_accum": 1,
            "combinator": combinator,
            "lr": 1e-7,
            "warmup_ratio": 0.0,
            # Many epochs of one step each, so the schedule is nowhere near its end.
            "epochs": 1000,
            "cache_dir": str(workdir / "cache"),
            "log_every": 1_000_000,
            "plots": False,
            "save_model": False,
            "tensorboard": False,
        }
    )
    return Trainer(config, workdir / "run")


def timed(fn, device: torch.device) -> tuple[object, float]:
    """(fn(), seconds) with the device drained on both sides: one call is seconds long."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Correctness


def reference_gram(rows: torch.Tensor) -> torch.Tensor:
    G = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[1], REF_CHUNK):
        block = rows[:, start : start + REF_CHUNK].double()
        G += block @ block.T
    return G


def relative_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max |value - ref| / max |ref|, computed a chunk at a time for long vectors."""
    worst, scale = 0.0, 0.0
    flat_value, flat_ref = value.reshape(-1), ref.reshape(-1)
    for start in range(0, flat_ref.numel(), REF_CHUNK):
        a = flat_value[start : start + REF_CHUNK].double()
        b = flat_ref[start : start + REF_CHUNK].double()
        worst = max(worst, (a - b).abs().max().item())
        scale = max(scale, b.abs().max().item())
    return worst / scale if scale > 0 else worst


def combine_step(trainer, combinator, losses: torch.Tensor, out: torch.Tensor) -> tuple:
    """What apply_update does before AdamW: (G, c), with the combined gradient in `out`.

    The trainer writes into buffers.flat, which is row 0 of the gradient buffer when the
    dtypes agree; the benchmark writes elsewhere so the rows stay the step's gradients.
    """
    from mofast.kernels import combine, gram

    rows = trainer.buffers.rows
    G = gram(rows)
    c = combinator.weights(losses, G)
    combine(rows, c, out=out)
    return G, c


def check_combine_steps(trainer, combinators: dict, losses: torch.Tensor) -> dict[str, dict]:
    """The combine step of every combinator against float64 on the trainer's gradients."""
    rows = trainer.buffers.rows
    G_ref = reference_gram(rows)
    if not torch.isfinite(G_ref).all() or (G_ref.diagonal() <= 0).any():
        raise SystemExit("the step left a zero or non-finite gradient; nothing to compare")

    errors = {}
    out = torch.empty_like(trainer.buffers.flat)
    for name, combinator in combinators.items():
        out.fill_(float("nan"))
        G, c = combine_step(trainer, combinator, losses, out)
        if not torch.isfinite(c).all() or (c < 0).any():
            raise SystemExit(f"{name}: coefficients {c.tolist()} are not finite and >= 0")

        c64 = c.double()
        direction = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
        for start in range(0, rows.shape[1], REF_CHUNK):
            block = rows[:, start : start + REF_CHUNK].double()
            direction[start : start + REF_CHUNK] = c64 @ block
        gram_error = relative_error(G, G_ref)
        combine_error = relative_error(out, direction)
        if not (gram_error <= 1e-5 and combine_error <= 1e-5):
            raise SystemExit(
                f"{name}: combine step differs from float64 (gram {gram_error:.2e}, "
                f"combined gradient {combine_error:.2e})"
            )
        errors[name] = {"gram_rel_err": gram_error, "combine_rel_err": combine_error}
    return errors


# ---------------------------------------------------------------------------------------------
# The benchmark


def main() -> int:
    parser = bench_parser(__doc__, "timed steps per combinator (3)")
    parser.add_argument("--quick", action="store_true", help="1 layer, 32 tokens, 1 round")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 2)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (128)")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per objective and step")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()

    layers = args.layers or (1 if args.quick else 2)
    max_length = args.max_length or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    update_repeats = 1 if args.quick else 8
    k = 4
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="mofast-bench-e2e-") as tmp:
        workdir = Path(tmp)
        params = write_model(workdir / "model", layers)
        objectives = write_objectives(workdir / "objectives", k)
        trainer = make_trainer(
            workdir, objectives, device=args.device, max_length=max_length, pairs=args.pairs
        )
        rows, summary = run(trainer, device, repeats, update_repeats)

    shape = (
        f"k={k} x {args.pairs} pair(s) x 2 rows x <= {max_length} tokens "
        f"(padded width {summary['width']}, {summary['tokens']} real tokens per step), "
        f"{layers}-layer Qwen2.5-0.5B shape, {params / 1e6:.1f}M parameters, V=151936, "
        f"{str(trainer.backend.dtype).removeprefix('torch.')}"
    )
    for row in rows:
        row.update(
            {
                "k": k,
                "layers": layers,
                "params": params,
                "pairs_per_objective": args.pairs,
                "max_length": max_length,
                "padded_width": summary["width"],
                "tokens_per_step": summary["tokens"],
                "dtype": str(trainer.backend.dtype).removeprefix("torch."),
                "repeats": repeats,
            }
        )

    print(f"\nend-to-end benchmark on {device_description(device)}: {shape}")
    columns = [
        "combinator",
        "step_s",
        "step_median_s",
        "fwd_bwd_s",
        "update_s",
        "combine_step_s",
        "combine_share",
        "ratio_vs_uniform",
        "ratio_vs_uniform_shared_fwd_bwd",
        "gram_rel_err",
        "combine_rel_err",
    ]
    print(format_table(rows, columns))
    if not args.no_csv:
        path = append_rows("e2e", rows, device=device)
        print(f"appended {len(rows)} rows to {path}")

    print(f"\nstep time over uniform's ({shape}):")
    for row in rows:
        print(
            f"  {row['combinator']:>15}: {row['ratio_vs_uniform']:.3f}x whole step, "
            f"{row['ratio_vs_uniform_shared_fwd_bwd']:.4f}x with the forward/backward shared; "
            f"combine step {row['combine_step_s'] * 1e3:.0f} ms = {row['combine_share']:.1%} "
            "of the step"
        )
    return 0


def run(trainer, device: torch.device, repeats: int, update_repeats: int) -> tuple[list, dict]:
    """Correctness first, then the timed rounds; returns the CSV rows and the batch shape."""
    from mofast.combinators import make_combinator

    config = trainer.config
    combinators = {
        name: make_combinator(
            name,
            k=trainer.k,
            eta=config.eta,
            max_iters=config.solver_max_iters,
            tol=config.solver_tol,
            method=config.solver_method,
            eps=config.eps,
        )
        for name in COMBINATORS
    }
    batches = trainer.prepare(trainer.sampler.window(0, 0))
    summary = {
        "width": max(mb.input_ids.shape[1] for micro in batches for mb in micro),
        "tokens": sum(mb.tokens for micro in batches for mb in micro),
    }

    # Step 0 (policy = reference) doubles as the warm-up of the forward and backward passes.
    trainer.combinator = combinators["uniform"]
    record = trainer.train_step(batches)
    losses = record[: trainer.k].clone()
    if not ((losses.double().cpu() - LN2).abs() <= 1e-3).all():
        raise SystemExit(f"step-0 losses {losses.tolist()} are not ln 2 = {LN2:.6f}")
    errors = check_combine_steps(trainer, combinators, losses)

    fwd_bwd = {name: [] for name in COMBINATORS}
    update = {name: [] for name in COMBINATORS}
    combine_only = {name: [] for name in COMBINATORS}
    for combinator in combinators.values():
        trainer.combinator = combinator
        trainer.apply_update(losses)

    for round_index in range(repeats):
        turn = round_index % len(COMBINATORS)
        order = COMBINATORS[turn:] + COMBINATORS[:turn]
        for name in order:
            trainer.combinator = combinators[name]
            stats, seconds = timed(lambda: trainer.accumulate_gradients(batches), device)
            fwd_bwd[name].append(seconds)
            losses = stats[:, 0]
            _, seconds = timed(partial(trainer.apply_update, losses), device)
            update[name].append(seconds)

    # The update alone is cheap next to the forward and backward passes: time it more often,
    # on the gradients of the last step, still round by round.
    combined = torch.empty_like(trainer.buffers.flat)
    for _ in range(update_repeats):
        for name, combinator in combinators.items():
            trainer.combinator = combinator
            update[name].append(timed(partial(trainer.apply_update, losses), device)[1])
            step = partial(combine_step, trainer, combinator, losses, combined)
            combine_only[name].append(timed(step, device)[1])

    # Contention only ever adds time, so the best of the repeats estimates the cost and the
    # median shows the spread.
    shared_fwd_bwd = min(t for times in fwd_bwd.values() for t in times)
    whole = {
        name: [f + u for f, u in zip(fwd_bwd[name], update[name][:repeats], strict=True)]
        for name in COMBINATORS
    }
    best = {name: min(whole[name]) for name in COMBINATORS}
    best_update = {name: min(update[name]) for name in COMBINATORS}
    load = os.getloadavg()[0]
    rows = []
    for name in COMBINATORS:
        combine_s = min(combine_only[name])
        rows.append(
            {
                "combinator": name,
                "step_s": best[name],
                "step_median_s": statistics.median(whole[name]),
                "fwd_bwd_s": min(fwd_bwd[name]),
                "update_s": best_update[name],
                "update_median_s": statistics.median(update[name]),
                "combine_step_s": combine_s,
                "combine_step_median_s": statistics.median(combine_only[name]),
                "combine_share": combine_s / best[name],
                "ratio_vs_uniform": best[name] / best["uniform"],
                "ratio_vs_uniform_shared_fwd_bwd": (shared_fwd_bwd + best_update[name])
                / (shared_fwd_bwd + best_update["uniform"]),
                "load_avg_1min": load,
                **errors[name],
            }
        )
    return rows, summary


if __name__ == "__main__":
    sys.exit(main())
