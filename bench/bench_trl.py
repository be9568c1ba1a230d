"""mofast at k = 1 against TRL's DPOTrainer: tokens per second and peak memory.

    python bench/bench_trl.py [--quick] [--device cpu|cuda] [--layers 2] [--pairs 4]
                              [--max-length 256] [--repeats 2]

Both train the same randomly initialised Qwen2.5-0.5B-Instruct-shaped model (written once
to a temporary folder; see bench_e2e.py for the configuration, vocabulary 151,936 kept) on
the same batch: `--pairs` real UltraFeedback pairs (the shipped overall_score set), chosen
and rejected rows of at most `--max-length` tokens, one optimiser step per batch, DPO with
beta 0.5, AdamW at lr 1e-7, the same precision on both sides (float32 on the CPU; on CUDA
float32 weights under bf16 autocast, TRL's `bf16=True`), no gradient checkpointing,
reference log-probs precomputed by both (mofast's default; TRL's `precompute_ref_log_probs`).
mofast runs as users run it, through its Trainer; TRL through DPOTrainer.train() with TRL
1.16's defaults otherwise.

The pairs are tokenised once, by mofast's rules with the Qwen2 tokenizer (ChatML template),
and TRL is handed those token ids (prompt / chosen / rejected), so both see the same
sequences and the same padded width. On the CPU TRL scores every position of the batch,
prompt and padding included; mofast scores the response tokens only.

Each side runs in its own subprocess, one after the other, so its peak resident memory
(VmHWM) is its own. Correctness before the timing is read: both step-0 losses must be
ln 2 (policy = reference), and both per-sequence reference log-probs, computed by each
library from the same weights and token ids, must agree. The step time excludes the first
step (warm-up); tokens per second counts the real (non-padding) tokens of both rows of
every pair. Rows go to bench/results/trl.csv; the ratios are printed last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_rows, bench_parser, device_description, format_table  # noqa: E402
from bench_e2e import (  # noqa: E402
    TOKENIZER_DIR,
    make_trainer,
    write_model,
    write_objectives,
)

LN2 = math.log(2)
PAIRS_FILE = "pairs.jsonl"


def rss_bytes(field: str = "VmHWM") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident memory.

    Not ru_maxrss: Linux carries it over from the parent across fork and exec, so a worker
    would report at least the parent's size.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def peak_device_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def split_pair(row: dict) -> dict:
    """mofast's encoded pair as TRL's prompt_ids / chosen_ids / rejected_ids.

    mofast masks the prompt out of both rows' labels identically and counts every response
    token, so the prompt is the masked prefix and the rest is the completion.
    """
    chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
    n = 0
    while n < len(row["chosen_labels"]) and row["chosen_labels"][n] == -100:
        n += 1
    for ids, labels in ((chosen, row["chosen_labels"]), (rejected, row["rejected_labels"])):
        if labels[:n] != [-100] * n or labels[n:] != ids[n:] or ids[:n] != chosen[:n]:
            raise SystemExit("a pair's labels are not a shared masked prompt plus its response")
    return {"prompt_ids": chosen[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)


def _precision(result: dict) -> str:
    autocast = result.get("autocast")
    return result["dtype"] + (f" weights, {autocast} autocast" if autocast else "")


def worker_mofast(args: argparse.Namespace) -> dict:
    # Imported before the baseline is read, as the TRL worker imports TRL first.
    importlib.import_module("mofast.trainer")

    device = torch.device(args.device)
    baseline = rss_bytes("VmRSS")
    workdir = Path(args.workdir)
    objectives = json.loads((workdir / "objectives.json").read_text())
    trainer = make_trainer(
        workdir, objectives, device=args.device, max_length=args.max_length, pairs=args.pairs
    )
    name = trainer.names[0]

    # The window holds the batch's pairs; TRL gets exactly these, in this order.
    window = trainer.sampler.window(0, 0)
    indices = [i for micro in window[name] for i in micro]
    dataset = trainer.datasets[name]
    with (workdir / PAIRS_FILE).open("w") as f:
        for i in indices:
            f.write(json.dumps(split_pair(dataset[i])) + "\n")
    reference = trainer.reference_table[name][indices].cpu()

    times, first_loss, tokens, width = [], None, 0, 0
    for step in range(1 + args.repeats):
        sync(device)
        start = time.perf_counter()
        batches = trainer.prepare(window)
        record = trainer.train_step(batches)
        sync(device)
        times.append(time.perf_counter() - start)
        if step == 0:
            first_loss = record[0].item()
            tokens = sum(mb.tokens for micro in batches for mb in micro)
            width = max(mb.input_ids.shape[1] for micro in batches for mb in micro)

    return {
        "step_s": times[1:],
        "first_step_s": times[0],
        "step0_loss": first_loss,
        "tokens": tokens,
        "padded_width": width,
        "logps_chosen": reference[:, 0].tolist(),
        "logps_rejected": reference[:, 1].tolist(),
        "dtype": str(trainer.backend.dtype).removeprefix("torch."),
        "autocast": trainer.backend.autocast
        and str(trainer.backend.autocast).removeprefix("torch."),
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "baseline_rss": baseline,
        "peak_rss": rss_bytes(),
        "peak_device": peak_device_bytes(device),
    }


def worker_trl(args: argparse.Namespace) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    device = torch.device(args.device)
    baseline = rss_bytes("VmRSS")
    workdir = Path(args.workdir)
    rows = [json.loads(line) for line in (workdir / PAIRS_FILE).read_text().splitlines()]
    dtype = getattr(torch, args.dtype)

    class PretokenisedDPOTrainer(DPOTrainer):
        # The rows are already tokenised (by mofast's rules), so both runs see the same ids.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = AutoModelForCausalLM.from_pretrained(
        workdir / "model", dtype=dtype, attn_implementation="sdpa"
    ).to(device)
    config = DPOConfig(
        output_dir=str(workdir / "trl-run"),
        per_device_train_batch_size=len(rows),
        precompute_ref_batch_size=len(rows),
        gradient_accumulation_steps=1,
        max_steps=1 + args.repeats,
        learning_rate=1e-7,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        beta=0.5,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        precompute_ref_log_probs=True,
        gradient_checkpointing=False,
        # mofast's precision: float32 weights, and bf16 autocast where mofast uses it.
        bf16=args.autocast == "bfloat16",
        fp16=args.autocast == "float16",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        seed=0,
    )
    clock = StepClock()
    trainer = PretokenisedDPOTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    reference_chosen = list(trainer.train_dataset["ref_chosen_logps"])
    reference_rejected = list(trainer.train_dataset["ref_rejected_logps"])

    trainer.train()
    if len(clock.ends) != 1 + args.repeats or not clock.losses:
        raise SystemExit(f"TRL ran {len(clock.ends)} steps and logged {len(clock.losses)} losses")
    steps = [b - a for a, b in zip(clock.ends[:-1], clock.ends[1:], strict=True)]

    lengths = [
        len(r["prompt_ids"]) + len(r[side]) for r in rows for side in ("chosen_ids", "rejected_ids")
    ]
    return {
        "step_s": steps,
        "step0_loss": clock.losses[0],
        "tokens": sum(lengths),
        "padded_width": max(lengths),
        "logps_chosen": reference_chosen,
        "logps_rejected": reference_rejected,
        "dtype": args.dtype,
        "autocast": args.autocast,
        "params": sum(p.numel() for p in model.parameters()),
        "baseline_rss": baseline,
        "peak_rss": rss_bytes(),
        "peak_device": peak_device_bytes(device),
    }


# ---------------------------------------------------------------------------------------------
# The parent: prepares the model and data, runs the workers, compares and reports


def run_worker(which: str, args: argparse.Namespace, workdir: Path, extra: list[str]) -> dict:
    out = workdir / f"{which}.json"
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        which,
        "--workdir",
        str(workdir),
        "--out",
        str(out),
        "--device",
        args.device,
        "--pairs",
        str(args.pairs),
        "--max-length",
        str(args.max_length),
        "--repeats",
        str(args.repeats),
        *extra,
    ]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-8000:])
        raise SystemExit(f"the {which} worker failed with exit status {completed.returncode}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def compare(mofast: dict, trl: dict) -> dict:
    """The correctness checks; raises SystemExit naming the first that fails."""
    for name, result in (("mofast", mofast), ("trl", trl)):
        if abs(result["step0_loss"] - LN2) > 1e-3:
            raise SystemExit(f"{name}: step-0 loss {result['step0_loss']:.6f} is not ln 2")
    if (mofast["tokens"], mofast["padded_width"]) != (trl["tokens"], trl["padded_width"]):
        raise SystemExit(
            f"the batches differ: mofast {mofast['tokens']} tokens, width "
            f"{mofast['padded_width']}; trl {trl['tokens']} tokens, width {trl['padded_width']}"
        )

    ours = torch.tensor(mofast["logps_chosen"] + mofast["logps_rejected"], dtype=torch.float64)
    theirs = torch.tensor(trl["logps_chosen"] + trl["logps_rejected"], dtype=torch.float64)
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    # Both sum a few hundred float32 log-probs of about -12 each, in different orders.
    if not error <= 1e-4:
        raise SystemExit(f"per-sequence log-probs differ: relative error {error:.2e}")
    return {"logps_rel_diff": error}


def main() -> int:
    parser = bench_parser(__doc__, "timed steps (default 2)")
    parser.add_argument("--quick", action="store_true", help="1 layer, 2 pairs x 64 tokens")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 2)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per batch (default 4)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (256)")
    parser.add_argument("--worker", choices=("mofast", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--autocast", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    args.pairs = args.pairs or (2 if args.quick else 4)
    args.max_length = args.max_length or (64 if args.quick else 256)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.worker:
        worker = worker_mofast if args.worker == "mofast" else worker_trl
        Path(args.out).write_text(json.dumps(worker(args)))
        return 0

    layers = args.layers or (1 if args.quick else 2)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="mofast-bench-trl-") as tmp:
        workdir = Path(tmp)
        write_model(workdir / "model", layers)
        objectives = write_objectives(workdir / "objectives", k=1)
        (workdir / "objectives.json").write_text(json.dumps(objectives))

        mofast = run_worker("mofast", args, workdir, [])
        precision = ["--dtype", mofast["dtype"]]
        if mofast["autocast"]:
            precision += ["--autocast", mofast["autocast"]]
        trl = run_worker("trl", args, workdir, precision)
    checks = compare(mofast, trl)

    shape = (
        f"{args.pairs} pairs x 2 rows x <= {args.max_length} tokens (padded width "
        f"{mofast['padded_width']}, {mofast['tokens']} real tokens per step), {layers}-layer "
        f"Qwen2.5-0.5B shape, {mofast['params'] / 1e6:.1f}M parameters, V=151936, "
        f"{_precision(mofast)}, k=1"
    )
    load = os.getloadavg()[0]
    rows = []
    for name, result in (("mofast", mofast), ("trl DPOTrainer", trl)):
        best = min(result["step_s"])
        rows.append(
            {
                "method": name,
                "layers": layers,
                "params": result["params"],
                "pairs": args.pairs,
                "max_length": args.max_length,
                "padded_width": result["padded_width"],
                "tokens_per_step": result["tokens"],
                "dtype": _precision(result),
                "repeats": args.repeats,
                "step_s": best,
                "step_median_s": sorted(result["step_s"])[len(result["step_s"]) // 2],
                "tokens_per_s": result["tokens"] / best,
                "peak_rss_GB": result["peak_rss"] / 1e9,
                "rss_after_imports_GB": result["baseline_rss"] / 1e9,
                "peak_device_GB": (result["peak_device"] or 0) / 1e9,
                "step0_loss": result["step0_loss"],
                "wall_s": result["wall_s"],
                "load_avg_1min": load,
                **checks,
            }
        )

    print(f"\nmofast vs TRL on {device_description(device)}: {shape}")
    columns = [
        "method",
        "step_s",
        "step_median_s",
        "tokens_per_s",
        "peak_rss_GB",
        "rss_after_imports_GB",
        "peak_device_GB",
        "step0_loss",
        "logps_rel_diff",
        "wall_s",
    ]
    print(format_table(rows, columns))
    if not args.no_csv:
        path = append_rows("trl", rows, device=device)
        print(f"appended {len(rows)} rows to {path}")

    ours, theirs = rows
    memory = "peak_device_GB" if device.type == "cuda" else "peak_rss_GB"
    print(f"\nmofast over TRL's DPOTrainer ({shape}):")
    print(f"  tokens per second: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")
    print(f"  peak memory ({memory}): {ours[memory] / theirs[memory]:.2f}x of TRL's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
