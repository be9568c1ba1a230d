"""Benchmark of mofast's fused sequence log-probabilities in a DPO loss, forward + backward.

    python bench/bench_logprobs.py [--quick] [--device cpu|cuda] [--repeats R]

Side by side in one run, on the same inputs (the LM head's hidden states, weight and
labels, prompts masked so about 71% of the tokens count), each method computes the
sigmoid DPO loss (beta 0.1, no reference model, rows [0, N/2) chosen and [N/2, N)
rejected) and its gradients with respect to hidden and weight:
    mofast        mofast.kernels.sequence_logprobs, then the loss
    materialised  logits = hidden @ W.T, log_softmax in float32, gather, sum, then the loss
    liger         Liger-Kernel's LigerFusedLinearDPOLoss (chunked, torch.compile'd); left
                  out where liger_kernel is not installed (a lent GPU machine lacks it)
    mofast-8warps (CUDA only) mofast with 8 warps per program instead of the default 4: at
                  4 the forward kernel spills registers when compiled for sm_90, at 8 none
                  of the four kernels does; timed side by side to choose the default

Shapes: the CPU default is hidden [8, 512, 896], V = 151,936, float32; CUDA is
[16, 1024, 896], V = 151,936, bfloat16; --quick is [4, 128, 128] with the same vocabulary.

Correctness comes first: mofast is checked against a float64 materialised reference on a
small shape, and nothing is timed unless it passes; the large runs' losses and gradients
are then compared with the materialised path's.

Memory. CPU: each method runs in its own process; the peak is the process's ru_maxrss
(the kernel's high-water mark of resident memory) minus its resident memory just before
the first call, with the inputs already built. Compile workers (Liger's first call) are
separate processes, reported on their own from RUSAGE_CHILDREN. CUDA:
torch.cuda.max_memory_allocated above the allocation before the call. Both are reported
above the inputs, and above the inputs plus the gradients every method must return.

Time: the first call on its own, then the median of --repeats further calls, as wall
time and (CPU) as the process's CPU time, which other work on a shared machine disturbs
less. Rows go to bench/results/logprobs.csv; the ratios are printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_rows, device_description, format_table  # noqa: E402

METHODS = ("mofast", "materialised", "liger", "mofast-8warps")
BETA = 0.1
IGNORE = -100
SHAPES = {
    "cpu": (8, 512, 896, 151936, torch.float32),
    "cuda": (16, 1024, 896, 151936, torch.bfloat16),
    "quick": (4, 128, 128, 151936, torch.float32),
}


def make_inputs(N, T, H, V, dtype, device, seed=0):
    """hidden [N, T, H], weight [V, H], labels [N, T]; built in place so that building them
    leaves no temporaries behind to raise the process's high-water mark."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.empty(N, T, H, dtype=dtype, device=device)
    hidden.normal_(generator=gen)
    weight = torch.empty(V, H, dtype=dtype, device=device)
    weight.normal_(std=H**-0.5, generator=gen)
    labels = torch.randint(0, V, (N, T), generator=gen, device=device)
    # Prompts of 10% .. 48% of the row, masked out as DPO batches have them.
    for i in range(N):
        labels[i, : round(T * (0.10 + 0.38 * i / max(N - 1, 1)))] = IGNORE
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def dpo_loss(lp: torch.Tensor) -> torch.Tensor:
    chosen, rejected = lp.chunk(2)
    return -F.logsigmoid(BETA * (chosen - rejected)).mean()


def materialised_logprobs(hidden, weight, labels):
    logp = F.linear(hidden, weight).float().log_softmax(dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != IGNORE, picked, 0.0).sum(dim=1)


def make_step(method: str):
    """A function (hidden, weight, labels) -> loss, after its backward has run."""
    if method == "mofast":
        from mofast.kernels import sequence_logprobs

        return lambda h, w, y: _backward(dpo_loss(sequence_logprobs(h, w, y)))
    if method == "mofast-8warps":
        from mofast.kernels.logprobs import CUDA_TILING, _sequence_logprobs

        tiling = dataclasses.replace(CUDA_TILING, num_warps=8)
        return lambda h, w, y: _backward(
            dpo_loss(_sequence_logprobs(h, w, y, backend="triton", tiling=tiling))
        )
    if method == "materialised":
        return lambda h, w, y: _backward(dpo_loss(materialised_logprobs(h, w, y)))
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, use_ref_model=False)
        return lambda h, w, y: _backward(_first(loss_fn(w, h, y)))
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def liger_installed() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError:
        return False
    return True


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------
#  Correctness before timing
# ---------------------------------------------------------------------------------------


def check_small(device: str) -> float:
    """mofast against a float64 materialised reference on a small odd shape; the worst
    normwise relative error of the loss and both gradients."""
    from mofast.kernels import sequence_logprobs

    hidden, weight, labels = make_inputs(6, 37, 24, 5003, torch.float32, device, seed=1)
    loss = dpo_loss(sequence_logprobs(hidden, weight, labels))
    ours = [loss, *torch.autograd.grad(loss, (hidden, weight))]
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_loss = dpo_loss(materialised_logprobs(h64, w64, labels))
    ref = [ref_loss, *torch.autograd.grad(ref_loss, (h64, w64))]
    worst = max(
        ((a.double() - r).abs().max() / r.abs().max()).item()
        for a, r in zip(ours, ref, strict=True)
    )
    if not worst <= 1e-5:
        raise SystemExit(f"correctness check failed: error {worst:.3g} against float64")
    return worst


def compare(results: dict[str, dict], files: dict[str, str]) -> None:
    """Each method's loss and gradients against the materialised path's, normwise."""
    if "materialised" not in files:
        return
    ref = torch.load(files["materialised"])
    for method, path in files.items():
        out = torch.load(path)
        results[method]["error_vs_materialised"] = max(
            ((a.double() - r.double()).abs().max() / r.double().abs().max()).item()
            for a, r in zip(out, ref, strict=True)
        )


# ---------------------------------------------------------------------------------------
#  One method in its own process (CPU)
# ---------------------------------------------------------------------------------------


def worker(args) -> None:
    N, T, H, V, dtype = SHAPES[args.shape]
    torch.manual_seed(0)
    step = make_step(args.worker)
    hidden, weight, labels = make_inputs(N, T, H, V, dtype, "cpu")

    before = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start, cpu = time.perf_counter(), time.process_time()
    loss = step(hidden, weight, labels)
    first_s, first_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    torch.save([loss, hidden.grad, weight.grad], args.out + ".pt")

    samples, cpu_samples = [], []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        start, cpu = time.perf_counter(), time.process_time()
        step(hidden, weight, labels)
        samples.append(time.perf_counter() - start)
        cpu_samples.append(time.process_time() - cpu)

    with open(args.out, "w") as f:
        json.dump(
            {
                "first_s": first_s,
                "steady_s": statistics.median(samples) if samples else first_s,
                "first_cpu_s": first_cpu_s,
                "steady_cpu_s": statistics.median(cpu_samples) if cpu_samples else first_cpu_s,
                "extra_bytes": peak - before,
                # The high-water mark must not predate the call, or the peak is not its own.
                "peak_before_call_bytes": peak_before - before,
                "compile_workers_bytes": children,
                "counted": int((labels != IGNORE).sum()),
            },
            f,
        )


def run_cpu(args, methods) -> tuple[dict, dict]:
    results, files = {}, {}
    tmp = tempfile.mkdtemp(prefix="bench_logprobs_")
    for method in methods:
        out = os.path.join(tmp, f"{method}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--out", out]
        cmd += ["--shape", args.shape, "--repeats", str(args.repeats)]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            results[method] = json.load(f)
        files[method] = out + ".pt"
    return results, files


# ---------------------------------------------------------------------------------------
#  All methods in this process (CUDA)
# ---------------------------------------------------------------------------------------


def run_cuda(args, methods) -> tuple[dict, dict]:
    N, T, H, V, dtype = SHAPES[args.shape]
    hidden, weight, labels = make_inputs(N, T, H, V, dtype, "cuda")
    results, files = {}, {}
    tmp = tempfile.mkdtemp(prefix="bench_logprobs_")
    for method in methods:
        step = make_step(method)
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = step(hidden, weight, labels)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start
        extra = torch.cuda.max_memory_allocated() - before
        files[method] = os.path.join(tmp, f"{method}.pt")
        torch.save([loss.cpu(), hidden.grad.cpu(), weight.grad.cpu()], files[method])

        samples = []
        for _ in range(args.repeats):
            hidden.grad = weight.grad = None
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step(hidden, weight, labels)
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end) * 1e-3)
        results[method] = {
            "first_s": first_s,
            "steady_s": statistics.median(samples) if samples else first_s,
            "first_cpu_s": float("nan"),
            "steady_cpu_s": float("nan"),
            "extra_bytes": extra,
            "peak_before_call_bytes": 0,
            "compile_workers_bytes": 0,
            "counted": int((labels != IGNORE).sum()),
        }
        del step
    return results, files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small shape, for a smoke run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls after the first")
    parser.add_argument("--no-csv", action="store_true", help="print only, append no rows")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, help="default: all (mofast-8warps on CUDA only)"
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=tuple(SHAPES), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker(args)
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.shape = "quick" if args.quick else device
    if args.methods is None:
        args.methods = [m for m in METHODS if device == "cuda" or m != "mofast-8warps"]
    if device != "cuda" and "mofast-8warps" in args.methods:
        raise SystemExit("mofast-8warps runs the Triton kernels: it needs --device cuda")
    if "liger" in args.methods and not liger_installed():
        print("liger_kernel is not installed: its row is left out")
        args.methods = [method for method in args.methods if method != "liger"]
    if args.repeats is None:
        args.repeats = 5 if device == "cuda" else 1
    N, T, H, V, dtype = SHAPES[args.shape]

    err = check_small(device)
    print(f"correctness: mofast against float64 on [6, 37, 24] x V 5003: {err:.2e} (<= 1e-5)")

    runner = run_cuda if device == "cuda" else run_cpu
    results, files = runner(args, args.methods)
    compare(results, files)

    size = torch.finfo(dtype).bits // 8
    inputs = (N * T * H + V * H) * size + N * T * 8
    grads = (N * T * H + V * H) * size
    rows = []
    for method in args.methods:
        r = results[method]
        rows.append(
            {
                "method": method,
                "shape": f"[{N},{T},{H}]xV{V}",
                "dtype": str(dtype).removeprefix("torch."),
                "counted": r["counted"],
                "first_s": r["first_s"],
                "steady_s": r["steady_s"],
                "steady_cpu_s": r["steady_cpu_s"],
                "extra_GB": r["extra_bytes"] / 1e9,
                "extra_beyond_grads_GB": (r["extra_bytes"] - grads) / 1e9,
                "compile_workers_GB": r["compile_workers_bytes"] / 1e9,
                "error_vs_materialised": r.get("error_vs_materialised", float("nan")),
            }
        )
        if r["peak_before_call_bytes"] > r["extra_bytes"]:
            print(f"warning: {method}'s high-water mark predates its call; its peak is a bound")

    print(
        f"device: {device_description(device)}; inputs {inputs / 1e9:.3f} GB, gradients "
        f"{grads / 1e9:.3f} GB; memory on {'CUDA' if device == 'cuda' else 'ru_maxrss'}"
    )
    print(format_table(rows))
    if not args.no_csv:
        path = append_rows("logprobs", rows, device=device)
        print(f"rows appended to {path}")

    by = {row["method"]: row for row in rows}
    if "mofast" in by:
        for base in ("materialised", "liger"):
            if base in by:
                ours, theirs = by["mofast"], by[base]
                t = ours["steady_s"] / theirs["steady_s"]
                c = ours["steady_cpu_s"] / theirs["steady_cpu_s"]
                m = ours["extra_GB"] / theirs["extra_GB"]
                mg = ours["extra_beyond_grads_GB"] / theirs["extra_beyond_grads_GB"]
                print(
                    f"mofast / {base}: time {t:.3f}x (process CPU time {c:.3f}x), extra memory "
                    f"{m:.4f}x ({mg:.4f}x beyond the gradients)"
                )
        if "mofast-8warps" in by:
            t = by["mofast-8warps"]["steady_s"] / by["mofast"]["steady_s"]
            print(f"mofast with 8 warps / with the default 4: time {t:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
