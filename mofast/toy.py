"""`mofast toy`: the two-objective toy problem of SPEC section 3, for every combinator.

theta in R^2; both objectives share the optimum theta* = (0, 1):

    L_1(theta) = theta_1^2 + (theta_2 - 1)^2
    L_2(theta) = 20 * (exp((||theta||^2 - 1)^2) - 1)

From theta0 = (0.8, -0.2), each combinator mixes the two autograd gradients through the
Gram matrix, and torch.optim.Adam (lr 5e-3) takes d = sum_i c_i g_i as theta's gradient.
The count is the number of Adam steps until ||theta - theta*|| < 0.01. Everything is
float64 on the CPU, so the counts are the same on every run.
"""

import argparse
import dataclasses
import json
import logging

import torch

from mofast.combinators import COMBINATORS, SOLVER_METHODS, make_combinator

logger = logging.getLogger(__name__)

THETA0 = (0.8, -0.2)
THETA_STAR = (0.0, 1.0)
LEARNING_RATE = 5e-3
GROUPDRO_ETA = 0.01
TOLERANCE = 0.01
DEFAULT_MAX_STEPS = 20_000

_DTYPE = torch.float64


@dataclasses.dataclass
class ToyRun:
    """One combinator's run: steps to converge (None if it did not within the budget),
    the path of theta [steps taken + 1, 2] from theta0, and the final distance to theta*."""

    name: str
    steps: int | None
    trajectory: torch.Tensor
    final_distance: float


def toy_losses(theta: torch.Tensor) -> torch.Tensor:
    """(L_1, L_2) [..., 2] at theta [..., 2]; works on a grid as on one point."""
    x, y = theta[..., 0], theta[..., 1]
    first = x.square() + (y - 1.0).square()

    # expm1 is exp(.) - 1 without the cancellation near the unit circle, where L_2 -> 0
    # and mgda-decoupled divides by it.
    second = 20.0 * torch.expm1((theta.square().sum(-1) - 1.0).square())
    return torch.stack([first, second], dim=-1)


def solve_toy(
    name: str,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_iters: int = 20,
    tol: float = 1e-8,
    method: str = "frank-wolfe",
) -> ToyRun:
    """Runs the toy problem with the combinator `name` for at most max_steps Adam steps."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    combinator = make_combinator(
        name, k=2, eta=GROUPDRO_ETA, max_iters=max_iters, tol=tol, method=method
    )
    theta = torch.tensor(THETA0, dtype=_DTYPE, requires_grad=True)
    theta_star = torch.tensor(THETA_STAR, dtype=_DTYPE)
    optimizer = torch.optim.Adam([theta], lr=LEARNING_RATE)
    trajectory = torch.full((max_steps + 1, 2), float("nan"), dtype=_DTYPE)
    trajectory[0] = theta.detach()

    steps = None
    for step in range(1, max_steps + 1):
        losses = toy_losses(theta)
        grads = torch.stack(
            [torch.autograd.grad(losses[i], theta, retain_graph=i == 0)[0] for i in range(2)]
        )

        weights = combinator.weights(losses.detach(), grads @ grads.T)
        theta.grad = weights @ grads
        optimizer.step()

        trajectory[step] = theta.detach()
        if torch.linalg.vector_norm(theta.detach() - theta_star) < TOLERANCE:
            steps = step
            break

    taken = max_steps if steps is None else steps
    final = float(torch.linalg.vector_norm(trajectory[taken] - theta_star))
    return ToyRun(name, steps, trajectory[: taken + 1].clone(), final)


def solve_all(**options) -> dict[str, ToyRun]:
    """solve_toy for every combinator, in the order of COMBINATORS."""
    return {name: solve_toy(name, **options) for name in COMBINATORS}


def format_table(runs: dict[str, ToyRun], max_steps: int) -> str:
    """The runs, fastest first, those that did not converge last."""
    order = sorted(runs.values(), key=lambda r: (r.steps is None, r.steps or 0, r.name))
    header = f"{'combinator':<17} {'steps':>17}  {'final ||theta - theta*||':>24}"
    lines = [
        f"toy problem (SPEC 3): Adam lr {LEARNING_RATE:g}, groupdro eta {GROUPDRO_ETA:g}, "
        f"steps until ||theta - theta*|| < {TOLERANCE:g}, budget {max_steps} steps",
        header,
        "-" * len(header),
    ]
    for run in order:
        steps = "did not converge" if run.steps is None else str(run.steps)
        lines.append(f"{run.name:<17} {steps:>17}  {run.final_distance:>24.3g}")
    return "\n".join(lines)


def plot_runs(runs: dict[str, ToyRun], path: str) -> None:
    """The trajectories over the contour lines of both losses, start and optimum marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = torch.linspace(-0.35, 1.25, 321, dtype=_DTYPE)
    ys = torch.linspace(-0.45, 1.25, 341, dtype=_DTYPE)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    surfaces = toy_losses(grid)

    fig, ax = plt.subplots(figsize=(8, 8), dpi=120)

    # L_2 is a steep ring around the unit circle (its zero set), so a few geometric levels
    # (each drawn on both sides of the ring) and the circle itself keep the picture readable.
    contour_first = ax.contour(
        xs,
        ys,
        surfaces[..., 0],
        levels=[0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0],
        colors="0.55",
        linewidths=0.7,
    )
    contour_second = ax.contour(
        xs,
        ys,
        surfaces[..., 1],
        levels=[0.1, 1.0, 10.0],
        colors="tab:olive",
        linewidths=0.8,
        linestyles="dashed",
    )
    ax.clabel(contour_first, fontsize=7, fmt="%g")
    ax.clabel(contour_second, fontsize=7, fmt="%g")
    circle = torch.linspace(0.0, 2.0 * torch.pi, 400, dtype=_DTYPE)
    ax.plot(circle.cos(), circle.sin(), color="tab:olive", lw=1.2)

    # Paths that overlap (uniform and mgda-normalised follow the same ring) stay visible:
    # the earlier ones are drawn wider, underneath.
    styles = {
        "uniform": ("tab:blue", "-", 4.0),
        "groupdro": ("tab:orange", "-", 2.2),
        "mgda": ("tab:red", "-", 2.2),
        "mgda-normalised": ("tab:purple", "--", 1.6),
        "mgda-decoupled": ("tab:green", "-", 2.2),
    }
    for run in runs.values():
        colour, style, width = styles.get(run.name, ("black", "-", 1.5))
        steps = "did not converge" if run.steps is None else f"{run.steps} steps"
        path_xy = run.trajectory
        ax.plot(
            path_xy[:, 0],
            path_xy[:, 1],
            color=colour,
            ls=style,
            lw=width,
            alpha=0.9,
            label=f"{run.name}: {steps}",
        )
        if run.steps is None:
            ax.plot(path_xy[-1, 0], path_xy[-1, 1], "X", color=colour, ms=10, mec="black")

    ax.plot(*THETA0, "ks", ms=9, zorder=5, label=f"start {THETA0}")
    ax.plot(*THETA_STAR, "*", color="gold", mec="black", ms=18, zorder=5, label="optimum (0, 1)")
    ax.plot([], [], "X", color="tab:red", mec="black", ms=9, ls="none", label="end of budget")
    ax.plot([], [], color="0.55", lw=0.7, label="contours of $L_1$")
    ax.plot([], [], color="tab:olive", lw=0.8, ls="dashed", label="contours of $L_2$")
    ax.plot([], [], color="tab:olive", lw=1.2, label="$L_2 = 0$ (unit circle)")

    ax.set_xlim(float(xs[0]), float(xs[-1]))
    ax.set_ylim(float(ys[0]), float(ys[-1]))
    ax.set_aspect("equal")
    ax.set_xlabel(r"$\theta_1$")
    ax.set_ylabel(r"$\theta_2$")
    ax.set_title(
        f"Toy problem (SPEC 3): Adam lr {LEARNING_RATE:g}, "
        f"steps to $\\|\\theta - \\theta^*\\| < {TOLERANCE:g}$"
    )
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-steps",
        type=int,
        default=DEFAULT_MAX_STEPS,
        help=f"step budget per combinator (default {DEFAULT_MAX_STEPS})",
    )
    parser.add_argument(
        "--method",
        choices=SOLVER_METHODS,
        default="frank-wolfe",
        help="min-norm solver of the mgda family (default frank-wolfe)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print {combinator: steps or null} as JSON instead of the table",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="draw the trajectories to this file")


def run(args: argparse.Namespace) -> int:
    if args.max_steps < 1:
        raise SystemExit(f"mofast toy: --max-steps must be at least 1, got {args.max_steps}")
    runs = solve_all(max_steps=args.max_steps, method=args.method)

    if args.json:
        print(json.dumps({name: r.steps for name, r in runs.items()}))
    else:
        print(format_table(runs, args.max_steps))

    if args.plot:
        plot_runs(runs, args.plot)
        logger.info("wrote the trajectories to %s", args.plot)
    return 0
