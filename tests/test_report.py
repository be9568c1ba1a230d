"""The report: tallies, the paired bootstrap on cases with a known answer, table marks, plot."""

import json
import math

import numpy as np
import pytest

from mofast import report
from mofast.cli import main as cli_main


def test_bootstrap_identical_systems_are_not_significant():
    rng = np.random.default_rng(11)
    scores = rng.choice([-1.0, 0.0, 1.0], size=203)
    result = report.paired_bootstrap(scores, scores.copy())
    assert result.delta == 0.0 and result.low == 0.0 and result.high == 0.0
    assert not result.significant and result.p_value == 1.0 and result.n == 203


def test_bootstrap_a_system_that_wins_every_prompt_is_significant():
    rng = np.random.default_rng(12)
    reference = rng.choice([-1.0, 0.0, 1.0], size=57, p=[0.5, 0.2, 0.3])
    result = report.paired_bootstrap(np.ones(57), reference)
    assert result.significant and result.low > 0.0
    assert result.delta == pytest.approx(100.0 * (1.0 - reference.mean()))
    assert result.p_value < 0.05

    # The mirror image: losing every prompt is no improvement.
    worse = report.paired_bootstrap(-np.ones(57), reference)
    assert not worse.significant and worse.high < 0.0


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(13)
    model = rng.choice([-1.0, 0.0, 1.0], size=1501, p=[0.3, 0.3, 0.4])
    reference = rng.choice([-1.0, 0.0, 1.0], size=1501, p=[0.35, 0.3, 0.35])
    result = report.paired_bootstrap(model, reference, resamples=10_000, seed=5)
    diff = 100.0 * (model - reference)
    half = 1.959964 * diff.std(ddof=1) / math.sqrt(diff.size)
    assert result.low == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert result.high == pytest.approx(diff.mean() + half, abs=0.15 * half)

    again = report.paired_bootstrap(model, reference, resamples=10_000, seed=5)
    assert (again.low, again.high) == (result.low, result.high)


def test_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="one length"):
        report.paired_bootstrap(np.ones(3), np.ones(4))
    empty = report.paired_bootstrap(np.array([]), np.array([]))
    assert empty.n == 0 and not empty.significant


def _write_folder(folder, systems, judge="openai:test@http://x", prompts=25):
    """An eval folder with results.jsonl rows made from {label: {question: [outcome]}}."""
    folder.mkdir(parents=True)
    rows = []
    for label, per_question in systems.items():
        for question, outcomes in per_question.items():
            for i, outcome in enumerate(outcomes):
                rows.append(
                    {
                        "model": label,
                        "prompt_id": f"p{i:03d}",
                        "question": question,
                        "order": "model_first",
                        "outcome": outcome,
                    }
                )
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"judge": judge, "heldout": {"prompts": prompts, "source": "s", "golden": "g"}}
    (folder / "eval.json").write_text(json.dumps(meta))


def _mixed(n, seed):
    rng = np.random.default_rng(seed)
    return list(rng.choice(["win", "tie", "loss"], size=n, p=[0.3, 0.2, 0.5]))


def test_report_tallies_marks_and_plot(tmp_path):
    n = 25
    reference = _mixed(n, 1)
    systems = {
        "REFERENCE": {"overall": reference, "honesty": _mixed(n, 2)},
        "always-wins": {"overall": ["win"] * n, "honesty": _mixed(n, 3)},
        "same": {"overall": list(reference), "honesty": _mixed(n, 4)},
        "flaky": {"overall": ["invalid"] * 5 + ["tie"] * (n - 5), "honesty": _mixed(n, 5)},
    }
    folder = tmp_path / "eval"
    _write_folder(folder, systems)
    assert cli_main(["report", str(folder), "--resamples", "2000"]) == 0

    text = (folder / "report.md").read_text()
    net_table = text.split("## Net win rate (%)")[1].split("##")[0]
    lines = {line.split("|")[1].strip(): line for line in net_table.splitlines() if "|" in line}
    # Best in the overall column is bold; only the system that always wins is marked †.
    assert "**+100.0**†" in lines["always-wins"]
    ref_net = 100.0 * (reference.count("win") - reference.count("loss")) / n
    assert f"| {ref_net:+.1f} |" in lines["same"] and "†" not in lines["same"]
    assert "†" not in lines["REFERENCE"] and "†" not in lines["flaky"]

    numbers = json.loads((folder / "report.json").read_text())
    flaky = next(r for r in numbers if r["model"] == "flaky" and r["question"] == "overall")
    assert (flaky["invalid"], flaky["tie"], flaky["win"], flaky["loss"]) == (5, n - 5, 0, 0)
    assert flaky["net"] == 0.0 and flaky["bootstrap"]["n"] == n - 5
    same = next(r for r in numbers if r["model"] == "same" and r["question"] == "overall")
    assert same["bootstrap"]["delta"] == 0.0 and not same["bootstrap"]["significant"]
    wins = next(r for r in numbers if r["model"] == "always-wins" and r["question"] == "overall")
    assert wins["bootstrap"]["significant"] and wins["bootstrap"]["low"] > 0

    detail = text.split("## Win / tie / loss per question")[1]
    flaky_row = next(line for line in detail.splitlines() if "| overall | flaky |" in line)
    cells = [c.strip() for c in flaky_row.split("|")]
    assert cells[3:10] == ["0.0", "100.0", "**0.0**", "+0.0", "5", "0", str(n - 5)]

    png = folder / "net_win_rate.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_report_over_several_folders_shares_an_identical_reference(tmp_path):
    n = 19
    reference = {"overall": _mixed(n, 6)}
    _write_folder(tmp_path / "a", {"REFERENCE": reference, "m": {"overall": ["win"] * n}})
    _write_folder(tmp_path / "b", {"REFERENCE": reference, "m": {"overall": ["loss"] * n}})
    text, rows, labels, _, _ = report.build_report([tmp_path / "a", tmp_path / "b"], resamples=1000)
    assert labels == ["REFERENCE", "m", "m (b)"]
    by = {r.label: r for r in rows}
    assert by["m"].test.significant and not by["m (b)"].test.significant
    assert "| m (b) |" in text
    assert "not comparable" not in text

    # Folders judged on other held-out sets were merged into one table without a word.
    _write_folder(tmp_path / "c", {"REFERENCE": reference, "m": {"overall": ["win"] * n}},
                  prompts=5)  # fmt: skip
    text, *_ = report.build_report([tmp_path / "a", tmp_path / "c"], resamples=100)
    assert "different held-out sets or by different judges" in text


def test_report_without_a_reference_or_results(tmp_path):
    _write_folder(tmp_path / "solo", {"m": {"overall": _mixed(9, 7)}})
    text, rows, _, _, _ = report.build_report([tmp_path / "solo"], resamples=100)
    assert rows[0].test is None and "no REFERENCE" in text
    # Without a REFERENCE the chart still shows the net win rate, with no difference panel.
    fig = report.figure(rows, ["m"], ["overall"])
    assert len(fig.axes) == 1
    report.plot(rows, ["m"], ["overall"], tmp_path / "solo.png")
    assert (tmp_path / "solo.png").read_bytes()[:4] == b"\x89PNG"

    with pytest.raises(FileNotFoundError, match="not a `mofast eval` output folder"):
        report.load_folder(tmp_path)
    assert cli_main(["report", str(tmp_path)]) == 2


def test_report_keeps_missing_verdicts_apart_from_invalid_and_says_so(tmp_path, caplog):
    n = 23
    reference = _mixed(n, 8)
    model = ["missing"] * 4 + ["invalid"] * 3 + _mixed(n - 7, 9)
    folder = tmp_path / "eval"
    _write_folder(folder, {"REFERENCE": {"overall": reference}, "m": {"overall": model}})
    caplog.set_level("ERROR", logger="mofast.report")
    # An incomplete evaluation exits 1, as `mofast eval` does when requests failed.
    assert cli_main(["report", str(folder), "--resamples", "500"]) == 1
    assert any(
        "4 of 46 verdicts are missing" in r.getMessage()
        and "run the same `mofast eval`" in r.getMessage()
        for r in caplog.records
    )

    text = (folder / "report.md").read_text()
    head = text.split("## Net win rate")[0]
    assert f"**4 of {2 * n} verdicts missing** in `{folder}`" in head
    assert "run the same `mofast eval` command again" in head
    detail = text.split("## Win / tie / loss per question")[1]
    header = next(line for line in detail.splitlines() if line.startswith("| question"))
    columns = [c.strip() for c in header.split("|")]
    row = next(line for line in detail.splitlines() if "| overall | m |" in line)
    cells = dict(zip(columns, (c.strip() for c in row.split("|")), strict=True))
    assert (cells["invalid"], cells["missing"], cells["n"]) == ("3", "4", str(n - 7))

    numbers = json.loads((folder / "report.json").read_text())
    mine = next(r for r in numbers if r["model"] == "m")
    assert (mine["invalid"], mine["missing"], mine["bootstrap"]["n"]) == (3, 4, n - 7)

    # Every verdict missing (the judge was unreachable): n/a rates, counted as missing only.
    _write_folder(tmp_path / "down", {"m": {"overall": ["missing"] * 5}})
    text, rows, _, _, read = report.build_report([tmp_path / "down"], resamples=100)
    assert (rows[0].tally.missing, rows[0].tally.invalid, rows[0].tally.valid) == (5, 0, 0)
    assert (read[0].missing, read[0].comparisons) == (5, 5)
    assert "**5 of 5 verdicts missing**" in text

    complete = tmp_path / "complete"
    _write_folder(complete, {"REFERENCE": {"overall": reference}, "m": {"overall": reference}})
    assert cli_main(["report", str(complete), "--resamples", "100"]) == 0
    assert "verdicts missing" not in (complete / "report.md").read_text()


@pytest.mark.parametrize("questions", [1, 5])
def test_chart_titles_fit_inside_the_figure(tmp_path, questions):
    # The narrowest chart (one question, REFERENCE and one model: 6 inches) cut the
    # difference panel's title off at both edges.
    names = ["overall", "helpfulness", "honesty", "instruction_following", "truthfulness"]
    n = 9
    systems = {
        label: {q: _mixed(n, seed + i) for i, q in enumerate(names[:questions])}
        for label, seed in (("REFERENCE", 1), ("m", 20))
    }
    _write_folder(tmp_path / "eval", systems)
    _, rows, labels, qs, _ = report.build_report([tmp_path / "eval"], resamples=100)
    fig = report.figure(rows, labels, qs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        box = ax.title.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, ax.get_title()


def test_chart_shows_each_models_net_win_rate_then_its_difference_from_reference(tmp_path):
    n = 21
    systems = {
        "REFERENCE": {"overall": _mixed(n, 10), "honesty": _mixed(n, 11)},
        "a": {"overall": ["win"] * n, "honesty": _mixed(n, 12)},
        "b": {"overall": _mixed(n, 13), "honesty": ["missing"] * 2 + _mixed(n - 2, 14)},
    }
    _write_folder(tmp_path / "eval", systems)
    _, rows, labels, questions, _ = report.build_report([tmp_path / "eval"], resamples=300)
    by = {(r.label, r.question): r for r in rows}
    fig = report.figure(rows, labels, questions, alpha=0.1)
    top, bottom = fig.axes

    # The top panel plots what the main table and the README call net win rate, per model.
    assert top.get_ylabel() == "net win rate (%)" and "REFERENCE" not in top.get_ylabel()
    assert [t.get_text() for t in top.get_legend().get_texts()] == labels
    heights = [p.get_height() for p in top.patches]
    assert heights == pytest.approx([by[(m, q)].tally.net for m in labels for q in questions])
    assert "REFERENCE" in bottom.get_ylabel() and "90%" in bottom.get_title()
    deltas = [p.get_height() for p in bottom.patches]
    assert deltas == pytest.approx([by[(m, q)].test.delta for m in ("a", "b") for q in questions])
