"""`mofast report`: win / tie / loss, net win rate and bootstrap significance (SPEC section 6).

Reads the `results.jsonl` of one or more `mofast eval` output folders. Per model and per
question (overall and each objective): the win, tie and loss rates of the model's
response against the golden one, over the valid verdicts, and the net win rate
(win% - loss%). Invalid replies (not 1, 2 or 0) and missing verdicts (failed judge
requests, which a rerun of `mofast eval` asks again) are counted apart, never as ties;
a report with missing verdicts says so at its top and exits with status 1.

Each model is compared with REFERENCE (the untouched starting model) by a paired
bootstrap over prompts: the prompt's score is +1 / 0 / -1 for win / tie / loss, the
statistic is the mean score difference (= the difference of net win rates), and an
improvement is significant when the lower end of the (1 - alpha) percentile interval is
above zero.

Writes a Markdown report (also printed), a JSON file with every number, and a bar chart
(PNG): each model's net win rate per question, REFERENCE's included, and below it each
model's difference from REFERENCE with its bootstrap interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from mofast.judges import QUESTIONS

logger = logging.getLogger(__name__)

REFERENCE = "REFERENCE"
OUTCOMES = ("win", "tie", "loss", "invalid", "missing")
SCORE = {"win": 1.0, "tie": 0.0, "loss": -1.0}

# Bounds the index matrix of one bootstrap chunk (resamples x prompts) to ~64 MB.
_CHUNK_ELEMENTS = 1 << 23


@dataclasses.dataclass
class System:
    """One model of one eval folder: its outcome per question and prompt."""

    label: str
    folder: str
    outcomes: dict[str, dict[str, str]]
    reference: System | None = None

    def scores(self, question: str) -> dict[str, float]:
        """+1 / 0 / -1 per prompt with a valid verdict."""
        return {pid: SCORE[o] for pid, o in self.outcomes.get(question, {}).items() if o in SCORE}


@dataclasses.dataclass
class Tally:
    win: int = 0
    tie: int = 0
    loss: int = 0
    invalid: int = 0
    missing: int = 0

    @property
    def valid(self) -> int:
        return self.win + self.tie + self.loss

    def rate(self, name: str) -> float:
        """Percentage of the valid verdicts (NaN when there are none)."""
        return 100.0 * getattr(self, name) / self.valid if self.valid else float("nan")

    @property
    def net(self) -> float:
        return self.rate("win") - self.rate("loss")


def tally(outcomes: dict[str, str]) -> Tally:
    counts = Tally()
    for outcome in outcomes.values():
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        setattr(counts, outcome, getattr(counts, outcome) + 1)
    return counts


@dataclasses.dataclass
class BootstrapResult:
    """Difference of net win rates (points) of a model over REFERENCE, with its interval."""

    delta: float
    low: float
    high: float
    p_value: float
    n: int
    significant: bool


def paired_bootstrap(
    model: np.ndarray,
    reference: np.ndarray,
    *,
    resamples: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> BootstrapResult:
    """Paired bootstrap over prompts of mean(model - reference), in net-win-rate points.

    `model[i]` and `reference[i]` are the scores (+1 / 0 / -1) of the same prompt i. The
    prompts are resampled with replacement `resamples` times (vectorised in chunks);
    `significant` means the whole (1 - alpha) percentile interval lies above zero, and
    `p_value` is the two-sided bootstrap p-value of "no difference".
    """
    model = np.asarray(model, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if model.shape != reference.shape or model.ndim != 1:
        raise ValueError(
            f"paired scores must be two 1-D arrays of one length: {model.shape}, {reference.shape}"
        )
    if not 0.0 < alpha < 1.0 or resamples < 1:
        raise ValueError(f"need 0 < alpha < 1 and resamples >= 1, got {alpha}, {resamples}")
    n = model.shape[0]
    if n == 0:
        nan = float("nan")
        return BootstrapResult(nan, nan, nan, nan, 0, False)

    diff = 100.0 * (model - reference)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, _CHUNK_ELEMENTS // n))
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        index = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[index].mean(axis=1)

    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    below, above = np.mean(means <= 0.0), np.mean(means >= 0.0)
    p_value = min(1.0, 2.0 * min(below, above))
    return BootstrapResult(
        float(diff.mean()), float(low), float(high), float(p_value), n, bool(low > 0.0)
    )


# ---------------------------------------------------------------------------------------
# Reading eval folders
# ---------------------------------------------------------------------------------------


def load_folder(folder: str | Path) -> tuple[list[System], dict]:
    """The systems of one eval folder (REFERENCE first when present) and its eval.json."""
    folder = Path(folder)
    results = folder / "results.jsonl"
    if not results.is_file():
        raise FileNotFoundError(f"{folder} is not a `mofast eval` output folder: no results.jsonl")
    meta_path = folder / "eval.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}

    outcomes: dict[str, dict[str, dict[str, str]]] = {}
    with open(results, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                label, question = row["model"], row["question"]
                outcomes.setdefault(label, {}).setdefault(question, {})[row["prompt_id"]] = row[
                    "outcome"
                ]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{results}:{number}: not a results row ({err})") from err

    systems = [System(label, str(folder), per_q) for label, per_q in outcomes.items()]
    systems.sort(key=lambda s: s.label != REFERENCE)
    reference = next((s for s in systems if s.label == REFERENCE), None)
    for system in systems:
        if system is not reference:
            system.reference = reference
    return systems, meta


@dataclasses.dataclass
class Folder:
    """One eval folder: its eval.json and how many of its comparisons lack a verdict."""

    path: str
    meta: dict
    comparisons: int
    missing: int


def gather(folders: list[str | Path]) -> tuple[list[System], list[Folder]]:
    """Systems of several folders, each model paired with its own folder's REFERENCE.

    REFERENCE rows that agree across folders are shown once; labels that clash are
    suffixed with their folder's name.
    """
    systems: list[System] = []
    read = []
    for folder in folders:
        found, meta = load_folder(folder)
        outcomes = [o for s in found for per_q in s.outcomes.values() for o in per_q.values()]
        read.append(Folder(str(folder), meta, len(outcomes), outcomes.count("missing")))
        for system in found:
            clash = next((s for s in systems if s.label == system.label), None)
            if clash is not None and clash.outcomes == system.outcomes:
                if system.label == REFERENCE:
                    for other in found:
                        if other.reference is system:
                            other.reference = clash
                continue
            if clash is not None:
                system.label = f"{system.label} ({Path(folder).name})"
            systems.append(system)

    first_reference = next((s for s in systems if s.label.startswith(REFERENCE)), None)
    for system in systems:
        if system.reference is None and not system.label.startswith(REFERENCE):
            system.reference = first_reference
    return systems, read


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    label: str
    question: str
    tally: Tally
    test: BootstrapResult | None


def analyse(
    systems: list[System],
    questions: list[str],
    *,
    resamples: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[Row]:
    rows = []
    for system in systems:
        for question in questions:
            counts = tally(system.outcomes.get(question, {}))
            test = None
            if system.reference is not None:
                mine = system.scores(question)
                theirs = system.reference.scores(question)
                common = sorted(set(mine) & set(theirs))
                test = paired_bootstrap(
                    np.array([mine[p] for p in common]),
                    np.array([theirs[p] for p in common]),
                    resamples=resamples,
                    alpha=alpha,
                    seed=seed,
                )
            rows.append(Row(system.label, question, counts, test))
    return rows


def _fmt(value: float, signed: bool = False) -> str:
    if value != value:
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _best(values: list[float], highest: bool = True) -> set[int]:
    finite = [v for v in values if v == v]
    if not finite:
        return set()
    target = max(finite) if highest else min(finite)
    return {i for i, v in enumerate(values) if v == target}


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def markdown(
    rows: list[Row], labels: list[str], questions: list[str], alpha: float, notes: list[str]
) -> str:
    """The report: net win rates (best bold, † significant), then the details per question."""
    by = {(r.label, r.question): r for r in rows}
    level = f"{100 * (1 - alpha):g}%"
    lines = ["# Evaluation against the golden responses", ""]
    lines += [f"- {note}" for note in notes]
    lines += [
        "- net win rate = win% - loss%, over the valid verdicts; **bold** = best in the "
        f"column; † = improvement over REFERENCE significant at alpha = {alpha:g} (paired "
        "bootstrap over prompts)",
        "",
        "## Net win rate (%)",
        "",
        "| model | " + " | ".join(questions) + " |",
        "| --- |" + " ---: |" * len(questions),
    ]
    cells = {label: [] for label in labels}
    for question in questions:
        nets = [by[(label, question)].tally.net for label in labels]
        best = _best(nets)
        for i, label in enumerate(labels):
            test = by[(label, question)].test
            mark = "†" if test is not None and test.significant else ""
            cells[label].append(_bold(_fmt(nets[i], signed=True), i in best) + mark)
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cells[label]) + " |")

    lines += [
        "",
        "## Win / tie / loss per question",
        "",
        f"Δ = net win rate minus REFERENCE's on the prompts both judged, with its {level} "
        "bootstrap interval and two-sided p-value.",
        "",
        "invalid = the judge replied something other than 1, 2 or 0; missing = the judge "
        "request failed, so there is no reply yet; n = valid verdicts.",
        "",
        "| question | model | win % | tie % | loss % | net | invalid | missing | n "
        f"| Δ vs REFERENCE [{level} CI] | p |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for question in questions:
        group = [by[(label, question)] for label in labels]
        best = {
            "win": _best([r.tally.rate("win") for r in group]),
            "loss": _best([r.tally.rate("loss") for r in group], highest=False),
            "net": _best([r.tally.net for r in group]),
        }
        for i, row in enumerate(group):
            t = row.tally
            if row.test is None:
                delta, p = "(reference)", ""
            else:
                mark = " †" if row.test.significant else ""
                delta = (
                    f"{_fmt(row.test.delta, True)} [{_fmt(row.test.low, True)}, "
                    f"{_fmt(row.test.high, True)}]{mark}"
                )
                p = "n/a" if row.test.p_value != row.test.p_value else f"{row.test.p_value:.4f}"
            lines.append(
                f"| {question} | {row.label} | {_bold(_fmt(t.rate('win')), i in best['win'])} "
                f"| {_fmt(t.rate('tie'))} | {_bold(_fmt(t.rate('loss')), i in best['loss'])} "
                f"| {_bold(_fmt(t.net, True), i in best['net'])} | {t.invalid} | {t.missing} "
                f"| {t.valid} | {delta} | {p} |"
            )
    return "\n".join(lines) + "\n"


def figure(rows: list[Row], labels: list[str], questions: list[str], alpha: float = 0.05):
    """The bar chart: each model's net win rate, then its difference from REFERENCE.

    The top panel shows the numbers of the report's main table (REFERENCE included, so its
    level is in view); the bottom one, drawn when some model has a REFERENCE, the paired
    difference with its bootstrap interval, `*` where the improvement is significant.
    Returns the matplotlib Figure (the caller saves and closes it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.label, r.question): r for r in rows}
    compared = [label for label in labels if by[(label, questions[0])].test is not None]
    panels = 2 if compared else 1
    width = 0.8 / len(labels)
    x = np.arange(len(questions))
    fig, axes = plt.subplots(
        panels,
        1,
        figsize=(max(6.0, 1.2 * len(questions) * len(labels)), 3.6 * panels),
        squeeze=False,
    )

    top = axes[0][0]
    for i, label in enumerate(labels):
        net = [by[(label, q)].tally.net for q in questions]
        offset = (i - (len(labels) - 1) / 2) * width
        top.bar(x + offset, net, width, label=label, color=f"C{i}")
    top.set_ylabel("net win rate (%)")
    top.set_title("Net win rate against the golden responses (win% - loss%)")

    if compared:
        bottom = axes[1][0]
        level = f"{100 * (1 - alpha):g}%"
        for label in compared:
            i = labels.index(label)
            tests = [by[(label, q)].test for q in questions]
            delta = np.array([t.delta for t in tests])
            err = np.array([[t.delta - t.low for t in tests], [t.high - t.delta for t in tests]])
            offset = (i - (len(labels) - 1) / 2) * width
            bottom.bar(x + offset, delta, width, yerr=err, capsize=3, color=f"C{i}")
            for xi, t in zip(x + offset, tests, strict=True):
                if t.significant:
                    bottom.annotate("*", (xi, t.high), ha="center", va="bottom", fontsize=12)
        bottom.set_ylabel("net win rate minus\nREFERENCE's (points)")
        # Room above the tallest interval for its significance mark.
        bottom.margins(y=0.15)
        # Two lines: on one, the narrowest chart (one question, 6 inches) cut it off.
        bottom.set_title(
            f"Difference from REFERENCE, {level} paired-bootstrap interval\n"
            "(* significant improvement)"
        )

    for (ax,) in axes:
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, [q.replace("_", "\n") for q in questions])
    top.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(
    rows: list[Row], labels: list[str], questions: list[str], path: Path, alpha: float = 0.05
) -> None:
    """Write `figure(...)` as a PNG."""
    fig = figure(rows, labels, questions, alpha)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def mixed_settings(read: list[Folder]) -> bool:
    """Whether the folders differ in held-out data (source, size) or judge."""
    settings = {
        (
            f.meta.get("judge"),
            f.meta.get("heldout", {}).get("source"),
            f.meta.get("heldout", {}).get("prompts"),
        )
        for f in read
    }
    return len(settings) > 1


def build_report(
    folders: list[str | Path],
    *,
    resamples: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[str, list[Row], list[str], list[str], list[Folder]]:
    """(Markdown, rows, model labels, questions, folders read) for the given eval folders."""
    systems, read = gather(folders)
    if not systems:
        raise ValueError("the eval folders hold no results")
    present = {q for s in systems for q in s.outcomes}
    questions = [q for q in QUESTIONS if q in present] + sorted(present - set(QUESTIONS))
    labels = [s.label for s in systems]
    rows = analyse(systems, questions, resamples=resamples, alpha=alpha, seed=seed)

    notes = []
    for folder in read:
        if folder.missing:
            notes.append(
                f"**{folder.missing} of {folder.comparisons} verdicts missing** in "
                f"`{folder.path}`: their judge requests failed, so the rates and tests below use "
                "only the verdicts present; run the same `mofast eval` command again to ask "
                "only the missing ones"
            )
    if mixed_settings(read):
        notes.append(
            "**the folders were judged on different held-out sets or by different judges**: "
            "rows from different folders are not comparable (bold marks the best across all)"
        )
    for folder in read:
        meta, heldout = folder.meta, folder.meta.get("heldout", {})
        notes.append(
            f"`{folder.path}`: judge `{meta.get('judge', '?')}`, {heldout.get('prompts', '?')} "
            f"prompts from `{heldout.get('source', '?')}` ({heldout.get('golden', '?')})"
        )
    if not any(s.label.startswith(REFERENCE) for s in systems):
        notes.append("no REFERENCE in these folders: no significance test")
    notes.append(f"bootstrap: {resamples} resamples, seed {seed}")
    return markdown(rows, labels, questions, alpha, notes), rows, labels, questions, read


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", metavar="RUN_DIR", help="`mofast eval` output")
    parser.add_argument("--output", help="Markdown file (default: FIRST/report.md)")
    parser.add_argument("--plot", help="bar chart PNG (default: FIRST/net_win_rate.png)")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        text, rows, labels, questions, read = build_report(
            args.folders, resamples=args.resamples, alpha=args.alpha, seed=args.seed
        )
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2

    first = Path(args.folders[0])
    output = Path(args.output) if args.output else first / "report.md"
    png = Path(args.plot) if args.plot else first / "net_win_rate.png"
    output.write_text(text, encoding="utf-8")
    numbers = [
        {
            "model": r.label,
            "question": r.question,
            **dataclasses.asdict(r.tally),
            "net": r.tally.net,
            "bootstrap": dataclasses.asdict(r.test) if r.test else None,
        }
        for r in rows
    ]
    output.with_suffix(".json").write_text(json.dumps(numbers, indent=2) + "\n")
    plot(rows, labels, questions, png, args.alpha)
    print(text)
    logger.info("wrote %s, %s and %s", output, output.with_suffix(".json"), png)

    if mixed_settings(read):
        logger.warning(
            "the folders were judged on different held-out sets or by different judges: "
            "rows from different folders are not comparable"
        )
    incomplete = [f for f in read if f.missing]
    for folder in incomplete:
        logger.error(
            "%d of %d verdicts are missing in %s (failed judge requests); the report uses "
            "only the verdicts present: run the same `mofast eval` command again to ask only "
            "those",
            folder.missing,
            folder.comparisons,
            folder.path,
        )
    return 1 if incomplete else 0
