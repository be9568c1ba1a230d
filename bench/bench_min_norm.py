"""Benchmark of mofast's batched min-norm solver against the usual ways to solve MGDA's QP.

    python bench/bench_min_norm.py [--problems 10000] [--k 8] [--subset 300] [--cuda-problems N]

On the same random problems (Grams of random gradients, a fifth of them rank-deficient),
side by side in one run:
    mofast frank-wolfe  the native batched solver, the published recipe (20 iterations)
    mofast exact        the native batched solver, Wolfe's min-norm-point algorithm
    torchjd MGDA        TorchJD's MGDAWeighting applied to each Gram (its defaults)
    quadprog            an exact dense QP solver, one problem per call
    loop frank-wolfe    a straightforward per-problem Frank-Wolfe loop in torch, 20 iterations
Each is timed per problem (wall clock; for mofast also the CPU time of all its threads,
which a machine shared with other work does not inflate); the slow per-problem baselines
run on the first --subset problems. Each one's excess over the optimum v* = c*^T G c* (the
better of quadprog's and the exact method's values) is reported as the max and median of
(v - v*) / v* over problems whose optimum is not ~0 (v* > 1e-6 max_i G_ii), and of
(v - v*) / max_i G_ii over all problems.
A correctness check of the exact method against quadprog runs before anything is timed.
Without quadprog or torchjd installed (a lent GPU machine may lack them) their rows are
left out and the check falls back to the exact method's own optimality gap.
With a CUDA device, the Triton kernels also solve --cuda-problems problems (100,000 by
default) and are checked against the native solver first. Rows go to
bench/results/min_norm.csv; the ratios are printed last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

try:
    import quadprog
except ImportError:
    quadprog = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_rows, device_description, format_table, measure  # noqa: E402

# Below this fraction of the largest squared gradient norm an optimum counts as ~0 (the
# origin is in the hull) and a relative excess would mean nothing.
ZERO_OPTIMUM = 1e-6


def random_problems(n: int, k: int, seed: int) -> torch.Tensor:
    """Float64 Grams [n, k, k] of random Gaussian gradients in 48 dimensions, with norms
    spread over two decades. A fifth are rank-deficient: half of those have fewer
    dimensions (5) than objectives, half repeat one gradient and double another.
    """
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, k, 48, generator=gen, dtype=torch.float64)
    grads = grads * 10.0 ** (2 * torch.rand(n, k, 1, generator=gen, dtype=torch.float64) - 1)

    deficient = n // 5
    low = deficient // 2
    grads[:low, :, 5:] = 0.0
    grads[low:deficient, -1] = grads[low:deficient, 0]
    grads[low:deficient, -2] = 2.0 * grads[low:deficient, 1]

    # Shuffled, so the first problems (the per-problem baselines' subset) are a fair sample.
    order = torch.randperm(n, generator=gen)
    return (grads @ grads.mT)[order]


def values(G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    c = c.double()
    return torch.einsum("bi,bij,bj->b", c, G.double(), c)


def quadprog_solve(G: np.ndarray) -> np.ndarray:
    # quadprog needs a strictly positive definite matrix: a ridge of 1e-12 max diag (the
    # value is then taken on the original G, within the ridge of the optimum).
    k = G.shape[0]
    ridge = 1e-12 * max(float(np.diag(G).max()), 1e-300)
    constraints = np.hstack([np.ones((k, 1)), np.eye(k)])
    bounds = np.concatenate([[1.0], np.zeros(k)])
    x = quadprog.solve_qp(G + ridge * np.eye(k), np.zeros(k), constraints, bounds, meq=1)[0]
    x = np.clip(x, 0.0, None)
    return x / x.sum()


def frank_wolfe_loop(G: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """SPEC section 2's Frank-Wolfe written plainly for one problem: best-pair start, then
    `iters` exact line searches towards argmin (G c)_t."""
    k = G.shape[0]
    best, c = None, None
    for i in range(k):
        for j in range(i + 1, k):
            a, b, d = G[i, i], G[i, j], G[j, j]
            w = 1.0 if b >= a else 0.0 if b >= d else float(((d - b) / (a + d - 2 * b)).clamp(0, 1))
            value = w * w * a + 2 * w * (1 - w) * b + (1 - w) ** 2 * d
            if best is None or value < best:
                best = value
                c = torch.zeros(k, dtype=G.dtype)
                c[i], c[j] = w, 1 - w
    for _ in range(iters):
        gc = G @ c
        t = int(torch.argmin(gc))
        a, b, d = c @ gc, gc[t], G[t, t]
        keep = 1.0 if b >= a else 0.0 if b >= d else float((d - b) / (a + d - 2 * b))
        new = keep * c
        new[t] += 1 - keep
        change = float((new - c).abs().sum())
        c = new
        if change < 1e-8:
            break
    return c


def excess(v: torch.Tensor, best: torch.Tensor, scale: torch.Tensor) -> dict:
    nonzero = best > ZERO_OPTIMUM * scale
    rel = ((v - best) / best)[nonzero]
    normed = (v - best) / scale
    return {
        "rel_excess_max": rel.max().item() if rel.numel() else float("nan"),
        "rel_excess_median": rel.median().item() if rel.numel() else float("nan"),
        "norm_excess_max": normed.max().item(),
        "norm_excess_median": normed.median().item(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--subset", type=int, default=300, help="problems for slow baselines")
    parser.add_argument("--cuda-problems", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-csv", action="store_true", help="print only, append no rows")
    args = parser.parse_args()

    from mofast.kernels import min_norm

    try:
        from torchjd.aggregation import MGDAWeighting
    except ImportError:
        MGDAWeighting = None

    n, k = args.problems, args.k
    subset = min(args.subset, n)
    G = random_problems(n, k, args.seed)
    G32 = G.float()
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1)
    cpu = device_description("cpu")
    print(f"{n} problems at k = {k} on {cpu}; per-problem baselines on {subset} of them")

    # Correctness before timing: the exact method against quadprog, or else its own
    # duality gap c^T G c - min_j (G c)_j (an upper bound on its excess).
    exact, info = min_norm(G, method="exact", return_info=True)
    v_exact = values(G, exact)
    if quadprog is not None:
        qp = torch.from_numpy(np.stack([quadprog_solve(g) for g in G.numpy()]))
        v_qp = values(G, qp)
        ridge = 1e-12 * scale
        worst = ((v_exact - v_qp - ridge) / torch.maximum(v_qp, 1e-9 * scale)).max().item()
        against = "quadprog"
        best = torch.minimum(v_exact, v_qp)
    else:
        # The gap only bounds the excess (it stays up to ~1e-6 of a small optimum where the
        # excess against quadprog is ~1e-13), so it is judged against G's largest entry.
        worst = (info.gap / scale).max().item()
        against = "its own duality gap over G's largest diagonal entry (quadprog is not installed)"
        best = v_exact
    if worst > 1e-6:
        print(f"CHECK FAILED: the exact method is {worst:.3g} (relative) off, by {against}")
        return 1
    print(f"check passed: exact within {max(worst, 0.0):.2g} (relative), by {against}")

    rows = []

    def record(name: str, per_problem_s: float, c: torch.Tensor, count: int, **extra) -> None:
        v = values(G[:count], c)
        rows.append(
            {
                "solver": name,
                "k": k,
                "problems": count,
                "us_per_problem": per_problem_s * 1e6,
                **excess(v, best[:count], scale[:count]),
                **extra,
            }
        )

    # mofast, batched on all problems.
    for method in ("frank-wolfe", "exact"):
        for label, gram in (("float64", G), ("float32", G32)):
            t = measure(lambda g=gram, m=method: min_norm(g, method=m), repeats=args.repeats)
            # CPU time of all threads: what the solver costs on a machine shared with others.
            cpu_start = time.process_time()
            for _ in range(args.repeats):
                min_norm(gram, method=method)
            cpu_s = (time.process_time() - cpu_start) / args.repeats
            c, info = min_norm(gram, method=method, return_info=True)
            record(
                f"mofast {method} ({label})",
                t.median_s / n,
                c,
                n,
                cpu_us_per_problem=cpu_s / n * 1e6,
                mean_iterations=info.iterations.float().mean().item(),
                converged=info.converged.float().mean().item(),
            )

    # Per-problem baselines, each timed over the whole loop (one pass: they are slow).
    def per_problem(name: str, solve, count: int) -> None:
        start = time.perf_counter()
        c = torch.stack([solve(g) for g in G[:count]])
        record(name, (time.perf_counter() - start) / count, c, count)

    if MGDAWeighting is not None:
        weighting = MGDAWeighting()
        per_problem("torchjd MGDAWeighting", lambda g: weighting(g), subset)
    else:
        print("torchjd is not installed: its row is left out")
    if quadprog is not None:
        per_problem("quadprog", lambda g: torch.from_numpy(quadprog_solve(g.numpy())), n)
    else:
        print("quadprog is not installed: its row is left out")
    per_problem("loop frank-wolfe (torch)", frank_wolfe_loop, subset)

    if torch.cuda.is_available():
        rows.extend(bench_cuda(args, min_norm))

    columns = [
        "solver",
        "problems",
        "us_per_problem",
        "cpu_us_per_problem",
        "rel_excess_max",
        "rel_excess_median",
        "norm_excess_max",
        "norm_excess_median",
        "mean_iterations",
    ]
    print()
    print(format_table(rows, columns))
    if not args.no_csv:
        cpu_rows = [r for r in rows if "cuda" not in r["solver"]]
        path = append_rows("min_norm", cpu_rows, device="cpu")
        cuda_rows = [r for r in rows if "cuda" in r["solver"]]
        if cuda_rows:
            append_rows("min_norm", cuda_rows, device="cuda")
        print(f"\nrows appended to {path}")

    # Ratios last: each solver's time per problem over mofast's exact and Frank-Wolfe ones.
    ours = {r["solver"]: r["us_per_problem"] for r in rows}
    exact_us = ours["mofast exact (float64)"]
    fw_us = ours["mofast frank-wolfe (float64)"]
    print("\ntime per problem relative to mofast (float64, CPU, batched):")
    for row in rows:
        us = row["us_per_problem"]
        print(
            f"  {row['solver']:<34} {us:10.3f} us   {us / exact_us:9.2f}x exact"
            f"   {us / fw_us:9.2f}x frank-wolfe"
        )
    return 0


def bench_cuda(args, min_norm) -> list[dict]:
    """The Triton kernels on --cuda-problems problems, checked against the native solver."""
    n, k = args.cuda_problems, args.k
    G = random_problems(n, k, args.seed + 1)
    G_cuda = G.cuda()
    best = values(G, min_norm(G, method="exact"))
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1)
    rows = []
    for method in ("frank-wolfe", "exact"):
        for label, gram in (("float64", G_cuda), ("float32", G_cuda.float())):
            c = min_norm(gram, method=method).cpu()
            ref = min_norm(gram.cpu(), method=method)
            gap = (values(G, c) - values(G, ref)).abs().max() / scale.max()
            if gap > 1e-6:
                raise SystemExit(f"CUDA {method} ({label}) disagrees with the native solver")
            t = measure(lambda g=gram, m=method: min_norm(g, method=m), device="cuda")
            rows.append(
                {
                    "solver": f"mofast {method} ({label}, cuda)",
                    "k": k,
                    "problems": n,
                    "us_per_problem": t.median_s / n * 1e6,
                    **excess(values(G, c), best, scale),
                }
            )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
