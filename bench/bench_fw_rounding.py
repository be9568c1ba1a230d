"""How far min_norm lands from the two-gradient closed form on near-duplicate pairs.

    python bench/bench_fw_rounding.py [--draws 200000] [--seed 1] [--no-csv]

An accuracy sweep, not a timing. Most draws are 2 x 2 Grams of two nearly identical
gradients (norms and directions equal to 1e-1 .. 1e-16), where Frank-Wolfe's line search
divides rounding noise by rounding noise; the rest are random pairs. For each method it
reports, in units of 2^-53 max(a, d) (the rounding of the solver's scaled entries):
    value   c^T G c above the closed form's value (float64 evaluation of both)
    weight  |c_1 - w*| beyond 1e-12 (the test's absolute allowance), times the squared
            distance a + d - 2b between the gradients
The closed-form test in tests/test_min_norm.py allows 8 / 8 units for the exact method
and 24 (value) / 64 (weight) for Frank-Wolfe; this sweep is where those figures come from.
"""

from __future__ import annotations

import os
import random
import sys

import torch
from mofast.kernels import min_norm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_rows, bench_parser, format_table  # noqa: E402


def near_duplicate_pairs(draws: int, seed: int) -> torch.Tensor:
    """float64 [draws, 2, 2]: 80% of the off-diagonal entries within 1e-16 .. 1e-1 of the
    Cauchy-Schwarz bound, 70% of the second norms within 1e-16 .. 1e-1 of the first."""
    rng = random.Random(seed)
    rows = []
    for _ in range(draws):
        a = 10 ** rng.uniform(-6, 6)
        if rng.random() < 0.7:
            d = a * (1 + rng.choice([0, 1, -1]) * 10 ** rng.uniform(-16, -1))
        else:
            d = 10 ** rng.uniform(-6, 6)
        rho = 1 - 10 ** rng.uniform(-16, -1) if rng.random() < 0.8 else rng.uniform(-1, 1)
        b = rho * (a * d) ** 0.5
        rows.append([[a, b], [b, d]])
    return torch.tensor(rows, dtype=torch.float64)


def closed_form(G: torch.Tensor) -> torch.Tensor:
    """The exact weight of the first gradient, [draws]."""
    a, b, d = G[:, 0, 0], G[:, 0, 1], G[:, 1, 1]
    w = ((d - b) / (a + d - 2 * b)).clamp(0, 1)
    return torch.where(b >= a, 1.0, torch.where(b >= d, 0.0, w))


def value(G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ni,nij,nj->n", c, G, c)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--draws", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    G = near_duplicate_pairs(args.draws, args.seed).to(args.device)
    want = closed_form(G)
    optimum = value(G, torch.stack([want, 1 - want], dim=-1))
    unit = 2.0**-53 * torch.maximum(G[:, 0, 0], G[:, 1, 1])
    distance = G[:, 0, 0] + G[:, 1, 1] - 2 * G[:, 0, 1]

    rows = []
    for method in ("exact", "frank-wolfe"):
        c = min_norm(G, method=method)
        excess = (value(G, c) - optimum) / unit
        weight = ((c[:, 0] - want).abs() - 1e-12).clamp(min=0) * distance / unit
        rows.append(
            {
                "method": method,
                "draws": args.draws,
                "seed": args.seed,
                "max_value_units": excess.max().item(),
                "value_over_8": int((excess > 8).sum()),
                "max_weight_units": weight.max().item(),
                "weight_over_8": int((weight > 8).sum()),
            }
        )
    print(format_table(rows))
    if not args.no_csv:
        path = append_rows("fw_rounding", rows, device=args.device)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
