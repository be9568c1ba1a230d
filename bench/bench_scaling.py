"""The combine step (gram + solve + combine) against k at a fixed parameter count, and TorchJD.

    python bench/bench_scaling.py [--quick] [--device cpu|cuda] [--P N] [--k 2 4 ... 64]
                                  [--repeats 5]

For each k in {2, 4, 8, 16, 32, 64}, on one [k, P] float32 buffer of gradients (the layout
the trainer accumulates into), timed side by side:
    mofast step (mgda-decoupled)  gram -> MGDADecoupled.weights -> combine, as the trainer
    mofast step (mgda)            the same with plain MGDA, the problem TorchJD solves
    mofast gram / solve / combine the three parts of the decoupled step alone
    copy (floor)                  a device copy of the k buffers: one pass of k * P * 4
                                  bytes read (and written), the least a pass can cost
    torchjd MGDA                  torchjd.aggregation.MGDA()(matrix): its Gramian, its
                                  Frank-Wolfe weighting (defaults: epsilon 1e-3, at most
                                  100 iterations) and weights @ matrix (left out where
                                  torchjd is not installed, as on a lent GPU machine)

The gradients are synthetic but shaped like DPO's: every row is a shared direction plus
its own noise (cosine about 0.5 between rows), with norms spread over two decades, and the
losses are drawn in [0.3, 0.9]. Before anything is timed, mofast's Gram matrix and
combined gradient must match float64 (relative error <= 1e-5); every method's min-norm
objective ||d||^2 is compared with the exact optimum (Wolfe's method on the float64 Gram
matrix) and reported as a relative gap. Rows go to bench/results/scaling.csv; the ratios
(step over the copy floor, TorchJD over mofast) are printed last.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    append_rows,
    bench_parser,
    device_description,
    format_table,
    measure,
)

# Columns per step of the float64 references, to bound their memory.
REF_CHUNK = 1 << 22


def gradients(k: int, P: int, device: torch.device, seed: int) -> torch.Tensor:
    """[k, P] float32: rows = scale_i * (shared + noise_i), cosine about 0.5 between rows."""
    generator = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(k, P, device=device, generator=generator)
    shared = torch.randn(P, device=device, generator=generator)
    X += shared
    scales = 10.0 ** torch.empty(k, 1, device=device).uniform_(-1.0, 1.0, generator=generator)
    X *= scales
    return X


def reference_gram(X: torch.Tensor) -> torch.Tensor:
    G = torch.zeros(X.shape[0], X.shape[0], dtype=torch.float64, device=X.device)
    for start in range(0, X.shape[1], REF_CHUNK):
        block = X[:, start : start + REF_CHUNK].double()
        G += block @ block.T
    return G


def reference_combine(X: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    out = torch.empty(X.shape[1], dtype=torch.float64, device=X.device)
    c64 = c.double()
    for start in range(0, X.shape[1], REF_CHUNK):
        out[start : start + REF_CHUNK] = c64 @ X[:, start : start + REF_CHUNK].double()
    return out


def relative_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max |value - ref| / max |ref|."""
    diff = (value.double() - ref.double()).abs().max()
    return (diff / ref.double().abs().max()).item()


def squared_norm(d: torch.Tensor) -> float:
    total = 0.0
    for start in range(0, d.numel(), REF_CHUNK):
        block = d[start : start + REF_CHUNK].double()
        total += torch.dot(block, block).item()
    return total


def mofast_step(X: torch.Tensor, losses: torch.Tensor, combinator, out: torch.Tensor):
    """The trainer's combine step: gram -> coefficients -> combine into `out`."""
    from mofast.kernels.combine import combine
    from mofast.kernels.gram import gram

    G = gram(X)
    c = combinator.weights(losses, G)
    combine(X, c, out=out)
    return G, c


def torchjd_mgda():
    """TorchJD's MGDA aggregator, or None where torchjd is not installed (a lent GPU)."""
    try:
        from torchjd.aggregation import MGDA
    except ImportError:
        return None
    return MGDA()


def bench_one(k: int, P: int, device: torch.device, repeats: int, seed: int) -> list[dict]:
    from mofast.kernels.combine import combine
    from mofast.kernels.gram import gram

    from mofast.combinators import make_combinator

    X = gradients(k, P, device, seed)
    losses = torch.empty(k, device=device).uniform_(0.3, 0.9)
    out = torch.empty(P, device=device)
    decoupled = make_combinator("mgda-decoupled", k)
    plain = make_combinator("mgda", k)
    exact = make_combinator("mgda", k, method="exact")
    torchjd = torchjd_mgda()

    # Correctness: gram and combine against float64, both mofast variants.
    G_ref = reference_gram(X)
    optimum_c = exact.weights(losses, G_ref)
    optimum = (optimum_c @ G_ref @ optimum_c).item()
    checks = {}
    for label, combinator in (("decoupled", decoupled), ("mgda", plain)):
        out.fill_(float("nan"))
        G, c = mofast_step(X, losses, combinator, out)
        gram_error = relative_error(G, G_ref)
        combine_error = relative_error(out, reference_combine(X, c))
        if not (gram_error <= 1e-5 and combine_error <= 1e-5):
            raise SystemExit(
                f"k={k}: mofast {label} step differs from float64 (gram {gram_error:.2e}, "
                f"combine {combine_error:.2e})"
            )
        checks[label] = (gram_error, combine_error, c)
    mofast_mgda_d = out.clone()
    mofast_gap = squared_norm(mofast_mgda_d) / optimum - 1.0

    if torchjd is not None:
        torchjd_d = torchjd(X)
        if torchjd_d.shape != (P,) or not torch.isfinite(torchjd_d).all():
            raise SystemExit(
                f"k={k}: torchjd returned {tuple(torchjd_d.shape)} or non-finite values"
            )
        torchjd_gap = squared_norm(torchjd_d) / optimum - 1.0
        torchjd_vs_mofast = relative_error(torchjd_d, mofast_mgda_d)
        del torchjd_d
    del mofast_mgda_d

    c_decoupled = checks["decoupled"][2]
    G = gram(X)
    dst = torch.empty_like(X)
    methods = {
        "mofast step (mgda-decoupled)": partial(mofast_step, X, losses, decoupled, out),
        "mofast step (mgda)": partial(mofast_step, X, losses, plain, out),
        "mofast gram": partial(gram, X),
        "mofast solve (mgda-decoupled)": partial(decoupled.weights, losses, G),
        "mofast combine": partial(combine, X, c_decoupled, out=out),
        "copy (floor)": partial(dst.copy_, X),
    }
    if torchjd is not None:
        methods["torchjd MGDA"] = partial(torchjd, X)

    timings = {}
    for _ in range(repeats):
        # Round by round, so a change in the machine's load reaches every method alike.
        for name, fn in methods.items():
            t = measure(fn, warmup=1 if name not in timings else 0, repeats=1, device=device)
            timings.setdefault(name, []).append(t.median_s)
    del dst

    one_pass = X.numel() * X.element_size()
    copy_s = min(timings["copy (floor)"])
    load = os.getloadavg()[0]
    rows = []
    for name, samples in timings.items():
        row = {
            "k": k,
            "P": P,
            "dtype": "float32",
            "method": name,
            "best_ms": min(samples) * 1e3,
            "median_ms": sorted(samples)[len(samples) // 2] * 1e3,
            "one_pass_bytes": one_pass,
            "over_copy": min(samples) / copy_s,
            "load_avg_1min": load,
        }
        if name == "mofast step (mgda-decoupled)":
            row["gram_rel_err"], row["combine_rel_err"] = checks["decoupled"][:2]
        if name == "mofast step (mgda)":
            row["gram_rel_err"], row["combine_rel_err"] = checks["mgda"][:2]
            row["objective_gap"] = mofast_gap
        if name == "torchjd MGDA":
            row["objective_gap"] = torchjd_gap
            row["rel_diff_vs_mofast_mgda"] = torchjd_vs_mofast
        rows.append(row)
    return rows


def main() -> int:
    parser = bench_parser(__doc__, "timed rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="P = 1,000,003 and one round")
    parser.add_argument("--P", type=int, default=None, help="parameters (10M CPU, 166M GPU)")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
    # The GPU default is the 2-layer Qwen2.5-0.5B-shaped model's parameter count.
    P = args.P or (1_000_003 if args.quick else (165_960_320 if on_gpu else 10_000_019))
    repeats = args.repeats or (1 if args.quick else 5)
    if any(k < 2 for k in args.k):
        raise SystemExit(f"k must be at least 2 for a combine step worth timing, got {args.k}")

    print(f"combine-step scaling on {device_description(device)}: P = {P:,} float32")
    if torchjd_mgda() is None:
        print("torchjd is not installed: its rows are left out")
    rows = []
    for k in args.k:
        rows += bench_one(k, P, device, repeats, args.seed)
        if on_gpu:
            torch.cuda.empty_cache()

    columns = [
        "k",
        "method",
        "best_ms",
        "median_ms",
        "over_copy",
        "objective_gap",
        "rel_diff_vs_mofast_mgda",
        "gram_rel_err",
        "combine_rel_err",
    ]
    print(format_table(rows, columns))
    if not args.no_csv:
        path = append_rows("scaling", rows, device=device)
        print(f"appended {len(rows)} rows to {path}")

    by_k: dict = {}
    for row in rows:
        by_k.setdefault(row["k"], {})[row["method"]] = row
    print(f"\ncombine step against k (P = {P:,} float32, best of {repeats}):")
    for k, group in by_k.items():
        step = group["mofast step (mgda-decoupled)"]
        plain = group["mofast step (mgda)"]
        line = (
            f"  k={k:>2}: mofast decoupled step {step['best_ms']:8.1f} ms = "
            f"{step['over_copy']:.2f}x the copy floor ({step['one_pass_bytes'] / 1e9:.2f} GB "
            f"per pass); objective gap mofast {plain['objective_gap']:.1e}"
        )
        torchjd = group.get("torchjd MGDA")
        if torchjd is not None:
            line += (
                f"; torchjd MGDA {torchjd['best_ms'] / plain['best_ms']:.2f}x mofast mgda's "
                f"time, objective gap {torchjd['objective_gap']:.1e}"
            )
        print(line)
    first, last = min(by_k), max(by_k)
    growth = (
        by_k[last]["mofast step (mgda-decoupled)"]["best_ms"]
        / by_k[first]["mofast step (mgda-decoupled)"]["best_ms"]
    )
    print(
        f"  k {first} -> {last} ({last / first:.0f}x the bytes): the mofast step takes "
        f"{growth:.1f}x as long"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
