"""PNG plots of a finished run, drawn from its metrics.jsonl with matplotlib.

losses.png        per-objective DPO loss over optimiser steps (ln 2 marked: the start)
weights.png       the combinator's coefficient of each objective over steps
gram_cosines.png  cosines between the objectives' gradients: the last step's matrix,
                  and every off-diagonal pair over steps
"""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: list[dict], key: str) -> tuple[list[int], dict[str, list[float]]]:
    steps = [r["step"] for r in records]
    names = list(records[0][key]) if records else []
    return steps, {name: [r[key][name] for r in records] for name in names}


def _line_plot(steps, series, title, ylabel, path, hline=None):
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, values in series.items():
        ax.plot(steps, values, label=name, linewidth=1.5)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle=":", linewidth=1, label=hline[1])
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cosine_plot(records: list[dict], path: Path) -> None:
    names = list(records[-1]["losses"])
    last = records[-1]["gram_cosines"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)

    image = left.imshow(last, vmin=-1, vmax=1, cmap="coolwarm")
    left.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    left.set_yticks(range(len(names)), names, fontsize=8)
    for i, row in enumerate(last):
        for j, value in enumerate(row):
            left.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    left.set_title(f"gradient cosines, step {records[-1]['step']}")
    fig.colorbar(image, ax=left, fraction=0.046)

    steps = [r["step"] for r in records]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            values = [r["gram_cosines"][i][j] for r in records]
            right.plot(steps, values, label=f"{names[i]} / {names[j]}", linewidth=1.2)
    right.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    right.set_xlabel("optimiser step")
    right.set_ylabel("cosine")
    right.set_title("pairwise gradient cosines over steps")
    right.grid(alpha=0.3)
    if len(names) > 1:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_run(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw the run's plots into out_dir; returns the files written."""
    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} holds no steps to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    steps, losses = _series(records, "losses")
    _, weights = _series(records, "weights")
    written = [out / "losses.png", out / "weights.png", out / "gram_cosines.png"]
    _line_plot(steps, losses, "DPO loss per objective", "loss", written[0], (math.log(2), "ln 2"))
    _line_plot(steps, weights, "combinator coefficients", "coefficient", written[1])
    _cosine_plot(records, written[2])
    return written
