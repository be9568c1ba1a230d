"""The toy problem of SPEC section 3: the ordering of the combinators, plain mgda stalling
on the unit circle, step counts identical from run to run, and the `mofast toy` command."""

import json

import pytest
import torch

from mofast.cli import main
from mofast.toy import THETA0, THETA_STAR, solve_all, solve_toy, toy_losses

# Enough for every converging combinator (uniform, the slowest, needs 1200) while keeping
# the test in seconds; the command's default budget is 20,000.
BUDGET = 2000

# Measured with float64 on the CPU; the same on every run (checked below).
EXPECTED_STEPS = {
    "uniform": 1200,
    "groupdro": 822,
    "mgda": None,
    "mgda-normalised": 318,
    "mgda-decoupled": 265,
}


@pytest.fixture(scope="module")
def runs():
    return solve_all(max_steps=BUDGET)


def test_losses_match_the_spec_at_the_start_and_vanish_at_the_optimum():
    at_start = toy_losses(torch.tensor(THETA0, dtype=torch.float64))
    torch.testing.assert_close(
        at_start, torch.tensor([2.08, 2.157], dtype=torch.float64), rtol=0, atol=5e-4
    )
    at_optimum = toy_losses(torch.tensor(THETA_STAR, dtype=torch.float64))
    assert torch.equal(at_optimum, torch.zeros(2, dtype=torch.float64))


def test_the_combinators_come_in_the_spec_order(runs):
    steps = {name: run.steps for name, run in runs.items()}
    converged = [steps[n] for n in ["mgda-decoupled", "mgda-normalised", "groupdro", "uniform"]]
    assert None not in converged, steps
    assert converged == sorted(converged) and len(set(converged)) == 4, steps


def test_plain_mgda_stalls_on_the_unit_circle(runs):
    mgda = runs["mgda"]
    assert mgda.steps is None
    assert mgda.trajectory.shape == (BUDGET + 1, 2)
    end = mgda.trajectory[-1]
    assert abs(float(end.norm()) - 1.0) < 0.02
    assert mgda.final_distance > 0.5

    # Stalled, not slow: the last half of the budget moves theta by almost nothing.
    assert float((end - mgda.trajectory[BUDGET // 2]).norm()) < 0.05


def test_step_counts_are_pinned_and_identical_on_a_second_run(runs):
    assert {name: run.steps for name, run in runs.items()} == EXPECTED_STEPS
    for name in ["mgda-decoupled", "groupdro"]:
        again = solve_toy(name, max_steps=BUDGET)
        assert again.steps == runs[name].steps
        assert torch.equal(again.trajectory, runs[name].trajectory)


def test_converged_runs_end_within_the_tolerance(runs):
    for run in runs.values():
        if run.steps is not None:
            assert run.trajectory.shape == (run.steps + 1, 2)
            assert run.final_distance < 0.01
            assert torch.equal(run.trajectory[0], torch.tensor(THETA0, dtype=torch.float64))


def test_the_command_prints_json_and_draws_the_plot(tmp_path, capsys):
    png = tmp_path / "toy.png"
    assert main(["toy", "--json", "--max-steps", "300", "--plot", str(png)]) == 0

    # Within 300 steps only mgda-decoupled (265) gets there.
    printed = json.loads(capsys.readouterr().out)
    assert printed == {name: None for name in EXPECTED_STEPS} | {"mgda-decoupled": 265}
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_the_command_prints_a_table(capsys):
    assert main(["toy", "--max-steps", "330"]) == 0
    out = capsys.readouterr().out
    assert "budget 330 steps" in out
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    assert rows == ["mgda-decoupled", "mgda-normalised", "groupdro", "mgda", "uniform"]
    cells = {line.split()[0]: line for line in out.splitlines()[3:]}
    assert cells["mgda-decoupled"].split()[1] == "265"
    assert cells["mgda-normalised"].split()[1] == "318"
    for name in ["uniform", "groupdro", "mgda"]:
        assert "did not converge" in cells[name]


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="max_steps"):
        solve_toy("uniform", max_steps=0)
    with pytest.raises(SystemExit, match="--max-steps"):
        main(["toy", "--max-steps", "0"])
