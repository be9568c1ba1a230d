"""Benchmark of mofast's gram against the ways one would write it in plain torch.

    python bench/bench_gram.py [--device cpu|cuda] [--P N] [--k 4 8] [--dtype float32 ...]

Side by side on the same gradients, each timed as the median of repeats after a warm-up:
    mofast.gram  on a contiguous [k, P] buffer (one pass, fp64 accumulation across blocks)
    X @ X.T      on the same contiguous buffer
    stack + mm   k separate [P] buffers stacked into [k, P], then X @ X.T (stack timed)
    dots         k(k+1)/2 separate torch.dot calls on the k separate buffers
Each result's error against a float64 Gram is measured first, and mofast.gram must pass a
correctness check before anything is timed. Bandwidth is the bytes gram must read over
its time, also as a fraction of a measured device copy. Rows go to bench/results/gram.csv;
the ratios are printed last.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    append_rows,
    bench_parser,
    device_description,
    format_table,
    measure,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Columns per step of the float64 reference, to bound its memory.
REF_CHUNK = 1 << 22


def reference(X: torch.Tensor) -> torch.Tensor:
    G = torch.zeros(X.shape[0], X.shape[0], dtype=torch.float64, device=X.device)
    for start in range(0, X.shape[1], REF_CHUNK):
        block = X[:, start : start + REF_CHUNK].double()
        G += block @ block.T
    return G


def errors(G: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Normwise max |G - R| / max |R|, and the worst relative error on the diagonal."""
    diff = (G.double() - ref).abs()
    normwise = (diff.max() / ref.abs().max()).item()
    diagonal = (diff.diagonal() / ref.diagonal().abs()).max().item()
    return normwise, diagonal


def copy_bandwidth(X: torch.Tensor, repeats: int) -> float:
    """Bytes per second of a device copy of X (read plus write)."""
    dst = torch.empty_like(X)
    t = measure(lambda: dst.copy_(X), warmup=1, repeats=repeats, device=X.device)
    return 2 * X.numel() * X.element_size() / t.median_s


def bench_one(k: int, P: int, dtype: torch.dtype, device: torch.device, repeats: int) -> list:
    from mofast.kernels import gram

    # The k gradients as separate buffers (what autograd leaves) and as one [k, P] buffer.
    X = torch.randn(k, P, device=device).to(dtype)
    bufs = [X[i].clone() for i in range(k)]
    ref = reference(X)

    G = gram(X)
    normwise, _ = errors(G, ref)
    if not normwise <= 1e-5:
        raise SystemExit(f"gram failed its correctness check: error {normwise:.3g} at k={k}")

    pairs = [(i, j) for i in range(k) for j in range(i, k)]

    def dots() -> torch.Tensor:
        out = torch.empty(k, k, dtype=torch.float64, device=device)
        for i, j in pairs:
            out[i, j] = out[j, i] = torch.dot(bufs[i], bufs[j])
        return out

    def stack_mm() -> torch.Tensor:
        S = torch.stack(bufs)
        return S @ S.T

    methods = {
        "mofast.gram": lambda: gram(X),
        "X @ X.T": lambda: X @ X.T,
        "stack + mm": stack_mm,
        "dots": dots,
    }

    rows = []
    read_bytes = X.numel() * X.element_size()
    copy_bw = copy_bandwidth(X, repeats)
    for name, fn in methods.items():
        normwise, diagonal = errors(fn(), ref)
        t = measure(fn, warmup=1, repeats=repeats, device=device)
        bw = read_bytes / t.median_s
        rows.append(
            {
                "k": k,
                "P": P,
                "dtype": str(dtype).removeprefix("torch."),
                "method": name,
                "median_ms": t.median_ms,
                "min_ms": t.min_s * 1e3,
                "rel_err": normwise,
                "diag_rel_err": diagonal,
                "read_GBps": bw / 1e9,
                "copy_fraction": bw / copy_bw,
            }
        )
    return rows


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--P", type=int, default=None, help="columns (default: 20,000,003 CPU, 50,000,000 GPU)"
    )
    parser.add_argument("--k", type=int, nargs="+", default=None)
    parser.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES))
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
    # On a GPU a multiple of 16, as a model's parameter count is: with an odd P Triton can
    # prove no alignment and loads 2 bytes at a time (gpu_check.sh times that case too).
    P = args.P or (50_000_000 if on_gpu else 20_000_003)
    ks = args.k or ([4, 8, 16, 64] if on_gpu else [4, 8])
    default_dtypes = ["float32", "bfloat16"] if on_gpu else ["float32"]
    dtypes = [DTYPES[d] for d in (args.dtype or default_dtypes)]
    repeats = args.repeats or (20 if on_gpu else 5)

    print(f"gram benchmark on {device_description(device)}, P = {P:,}")
    rows = []
    for dtype in dtypes:
        for k in ks:
            rows += bench_one(k, P, dtype, device, repeats)

    print(format_table(rows))
    if not args.no_csv:
        path = append_rows("gram", rows, device=device)
        print(f"appended {len(rows)} rows to {path}")

    print("\nmofast.gram speed-up (baseline time / mofast time), and errors against float64:")
    for (dtype, k), group in _groups(rows).items():
        ours = group["mofast.gram"]
        parts = [
            f"{name} {group[name]['median_ms'] / ours['median_ms']:.2f}x"
            for name in group
            if name != "mofast.gram"
        ]
        print(
            f"  {dtype} k={k}: " + ", ".join(parts) + f"; {ours['copy_fraction']:.0%} of copy "
            f"bandwidth; diagonal error mofast {ours['diag_rel_err']:.1e} vs X @ X.T "
            f"{group['X @ X.T']['diag_rel_err']:.1e}"
        )
    return 0


def _groups(rows: list[dict]) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["dtype"], row["k"]), {})[row["method"]] = row
    return groups


if __name__ == "__main__":
    sys.exit(main())
