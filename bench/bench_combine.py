"""Benchmark of mofast's combine against plain torch, and against a device copy.

    python bench/bench_combine.py [--device cpu|cuda] [--P N] [--k 4 8] [--dtypes f32:f32 ...]

Side by side on the same gradients, each writing d = sum_i c_i g_i into the same output
buffer (whose dtype may differ from the gradients'), timed as the median of repeats:
    mofast.combine  one pass, fp32 accumulation, written in out's dtype
    c[:, None] * X  then .sum(0), then copied into out
    torch.mv        torch.mv(X.T, c), then copied into out
Bandwidth is the bytes combine must move (k rows read, one row written) over the time,
also as a fraction of a measured device copy. combine must pass a correctness check
against float64 before anything is timed. Rows go to bench/results/combine.csv; the
ratios are printed last.
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

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def reference(X: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 result and the scale of its rounding, sum_i |c_i g_i| (one pass each)."""
    value = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    scale = torch.zeros_like(value)
    for i in range(X.shape[0]):
        term = c[i].double() * X[i].double()
        value += term
        scale += term.abs()
    return value, scale


def error(d: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> float:
    value, scale = ref
    return ((d.double() - value).abs().max() / scale.max()).item()


def copy_bandwidth(X: torch.Tensor, repeats: int) -> float:
    """Bytes per second of a device copy of X (read plus write)."""
    dst = torch.empty_like(X)
    t = measure(lambda: dst.copy_(X), warmup=1, repeats=repeats, device=X.device)
    return 2 * X.numel() * X.element_size() / t.median_s


def bench_one(
    k: int, P: int, grad_dtype: torch.dtype, out_dtype: torch.dtype, device, repeats: int
) -> list[dict]:
    from mofast.kernels import combine

    X = torch.randn(k, P, device=device).to(grad_dtype)
    c = torch.rand(k, device=device)
    c /= c.sum()
    out = torch.empty(P, device=device, dtype=out_dtype)
    ref = reference(X, c)

    out.fill_(float("nan"))
    combine(X, c, out=out)
    err = error(out, ref)
    tolerance = 2.0**-7 if out_dtype in (torch.bfloat16, torch.float16) else 1e-6
    if not err <= tolerance:
        raise SystemExit(f"combine failed its correctness check: error {err:.3g} at k={k}")

    c_in = c.to(grad_dtype)
    methods = {
        "mofast.combine": lambda: combine(X, c, out=out),
        "(c[:, None] * X).sum(0)": lambda: out.copy_((c_in[:, None] * X).sum(0)),
        "torch.mv(X.T, c)": lambda: out.copy_(torch.mv(X.T, c_in)),
    }

    moved = X.numel() * X.element_size() + out.numel() * out.element_size()
    copy_bw = copy_bandwidth(X, repeats)
    rows = []
    for name, fn in methods.items():
        out.fill_(float("nan"))
        fn()
        err = error(out, ref)
        t = measure(fn, warmup=1, repeats=repeats, device=device)
        bw = moved / t.median_s
        rows.append(
            {
                "k": k,
                "P": P,
                "grad_dtype": str(grad_dtype).removeprefix("torch."),
                "out_dtype": str(out_dtype).removeprefix("torch."),
                "method": name,
                "median_ms": t.median_ms,
                "min_ms": t.min_s * 1e3,
                "rel_err": err,
                "GBps": bw / 1e9,
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
    parser.add_argument(
        "--dtypes", nargs="+", default=None, help="grads:out pairs, e.g. bf16:f32 (f32, bf16, f16)"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    # On a GPU a multiple of 16, as a model's parameter count is: with an odd P Triton can
    # prove no alignment and loads 2 bytes at a time (gpu_check.sh times that case too).
    P = args.P or (50_000_000 if on_gpu else 20_000_003)
    ks = args.k or ([4, 8, 16] if on_gpu else [4, 8])
    pairs = args.dtypes or (["f32:f32", "bf16:bf16", "bf16:f32"] if on_gpu else ["f32:f32"])
    repeats = args.repeats or (20 if on_gpu else 5)

    print(f"combine benchmark on {device_description(device)}, P = {P:,}")
    rows = []
    for pair in pairs:
        grad_name, out_name = pair.split(":")
        for k in ks:
            rows += bench_one(k, P, DTYPES[grad_name], DTYPES[out_name], device, repeats)

    print(format_table(rows))
    if not args.no_csv:
        path = append_rows("combine", rows, device=device)
        print(f"appended {len(rows)} rows to {path}")

    print("\nmofast.combine speed-up (baseline time / mofast time), and bandwidth:")
    groups: dict = {}
    for row in rows:
        key = (row["grad_dtype"], row["out_dtype"], row["k"])
        groups.setdefault(key, {})[row["method"]] = row
    for (grad_dtype, out_dtype, k), group in groups.items():
        ours = group["mofast.combine"]
        parts = [
            f"{name} {group[name]['median_ms'] / ours['median_ms']:.2f}x"
            for name in group
            if name != "mofast.combine"
        ]
        print(
            f"  {grad_dtype}->{out_dtype} k={k}: " + ", ".join(parts) + f"; {ours['GBps']:.1f} "
            f"GB/s = {ours['copy_fraction']:.0%} of copy bandwidth"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
