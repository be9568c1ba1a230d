"""Helpers shared by the benchmark scripts: which device ran, a careful timer, CSV rows.

Every benchmark appends its rows to bench/results/<name>.csv with the columns `device`,
`date` and `commit` first, so results from different machines and revisions can sit in
one file and still be told apart.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str | torch.device | None = None) -> str:
    """The GPU's name for a CUDA device, else the CPU model and the threads torch uses."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = os.cpu_count() or 1
    return f"{_cpu_model()} ({cores} cores, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    """The short hash of HEAD, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def append_rows(name: str, rows: list[dict], device: str | torch.device | None = None) -> Path:
    """Append `rows` to bench/results/<name>.csv, each prefixed by device, date and commit.

    A row with a column the file lacks rewrites the file with the union of the columns,
    so older rows keep their values and get empty cells in the new columns.
    """
    if not rows:
        raise ValueError("append_rows needs at least one row")

    stamp = {
        "device": device_description(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
    }
    new_rows = [{**stamp, **row} for row in rows]

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.csv"
    old_rows: list[dict] = []
    columns: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            old_rows = list(reader)

    wanted = list(columns)
    for row in new_rows:
        wanted.extend(key for key in row if key not in wanted)

    # Appending is enough while the header stays the same; otherwise rewrite everything.
    if wanted == columns:
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=columns).writerows(new_rows)
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=wanted)
            writer.writeheader()
            writer.writerows(old_rows + new_rows)
    return path


@dataclass(frozen=True)
class Timing:
    """Seconds per call over `repeats` timed calls after the warm-up."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @property
    def median_us(self) -> float:
        return self.median_s * 1e6

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device | None = None,
) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then the median of `repeats` timed calls.

    On a CUDA device each call is bracketed by CUDA events, so the time is the device's
    and not the launch's; on the CPU it is wall-clock time from perf_counter.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    device = torch.device(device or "cpu")

    for _ in range(warmup):
        fn()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) * 1e-3 for start, end in pairs]
    else:
        samples = []
        for _ in range(repeats):
            start_ns = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - start_ns) * 1e-9)

    return Timing(
        median_s=statistics.median(samples),
        min_s=min(samples),
        max_s=max(samples),
        repeats=repeats,
    )


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows as an aligned plain-text table; floats with four significant digits."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [columns] + [[cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in table
    )


def bench_parser(doc: str, repeats_help: str | None = None) -> argparse.ArgumentParser:
    """A parser with what every benchmark takes: --device (CUDA when there is one), --repeats
    (None: the benchmark's own default) and --no-csv. `doc`'s first line describes it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help=repeats_help)
    parser.add_argument("--no-csv", action="store_true", help="print only, append no rows")
    return parser
