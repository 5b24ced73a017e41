"""``tuneguard privacy``: tables, JSON for scripts, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tuneguard.cli import app
from tuneguard.privacy import analytic, noise_for_budget, spent, steps_for_budget, theorem1

runner = CliRunner()
PAPER = ["--delta", "1e-5", "--clip", "2", "--batch", "500", "--dataset-size", "60000", "--steps", "300"]


def run(*args: str):
    return runner.invoke(app, ["privacy", *args], env={"COLUMNS": "200"})


def test_eps_step_human_output():
    res = run("--eps-step", "0.1", *PAPER)
    assert res.exit_code == 0, res.output
    out = res.output
    for word in ("theorem1", "analytic", "rdp_wor", "advanced", "prv", "Assumptions", "replace-one"):
        assert word in out
    assert "inner epsilon" in out and ">= 1" in out  # Theorem 1's invalid regime is flagged
    assert f"{theorem1(0.1, 1e-5, 2, 500, 60000).sigma:.4g}" in out
    assert f"{analytic(0.1, 1e-5, 2, 500, 60000).sigma:.4g}" in out


def test_eps_step_json_matches_the_library():
    res = run("--eps-step", "0.1", *PAPER, "--accountants", "rdp,rdp_wor,advanced", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    per = {r["calibration"]: r for r in data["per_step"]}
    t1, an = theorem1(0.1, 1e-5, 2, 500, 60000), analytic(0.1, 1e-5, 2, 500, 60000)
    assert per["theorem1"]["sigma"] == pytest.approx(t1.sigma) and per["theorem1"]["valid"] is False
    assert per["analytic"]["sigma"] == pytest.approx(an.sigma) and per["analytic"]["valid"] is True
    assert per["theorem1"]["inner_eps"] == pytest.approx(t1.inner_eps)
    tot = {r["noise"]: r for r in data["totals"]}
    for label, cal in (("theorem1", t1), ("analytic", an)):
        for acc in ("rdp", "rdp_wor", "advanced"):
            expect = spent(cal.sigma, 2, 500, 60000, 300, 1e-5, method=acc).eps
            assert tot[label]["eps"][acc] == pytest.approx(expect)
        assert tot[label]["best"] in ("rdp_wor", "advanced")
    assert "adjacency" in data["assumptions"]


def test_target_eps_solves_for_the_noise():
    res = run("--target-eps", "2", *PAPER, "--accountants", "rdp_wor,advanced", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["accountant"]: r for r in json.loads(res.output)["noise_for_budget"]}
    for acc in ("rdp_wor", "advanced"):
        assert rows[acc]["sigma"] == pytest.approx(noise_for_budget(2, 1e-5, 2, 500, 60000, 300, accountant=acc))
        assert rows[acc]["eps_at_sigma"] <= 2
    human = run("--target-eps", "2", *PAPER, "--accountants", "rdp_wor")
    assert human.exit_code == 0 and "Noise for total eps=2" in human.output


def test_sigma_with_target_eps_gives_steps():
    res = run("--sigma", "0.01", "--target-eps", "2", *PAPER, "--accountants", "rdp,rdp_wor", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    steps = data["steps_for_budget"][0]["steps"]
    for acc in ("rdp", "rdp_wor"):
        assert steps[acc] == steps_for_budget(0.01, 2, 1e-5, 2, 500, 60000, accountant=acc)
    assert data["totals"][0]["eps"]["rdp_wor"] == pytest.approx(spent(0.01, 2, 500, 60000, 300, 1e-5, method="rdp_wor").eps)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--eps-step", "-1", "--batch", "500"], "--eps-step=-1.0 is not allowed: it must be > 0"),
        (["--eps-step", "0.1", "--batch", "70000"], "--batch=70000 is larger than --dataset-size=60000"),
        (["--eps-step", "0.1", "--batch", "0"], "--batch=0 is not allowed"),
        (["--eps-step", "0.1", "--batch", "5", "--delta", "1.5"], "--delta=1.5 is not allowed"),
        (["--eps-step", "0.1", "--batch", "5", "--clip", "0"], "--clip=0.0 is not allowed"),
        (["--sigma", "0.1", "--batch", "5", "--steps", "0"], "--steps=0 is not allowed"),
        (["--eps-step", "0.1", "--sigma", "0.1", "--batch", "5"], "not both"),
        (["--batch", "5"], "nothing to compute"),
        (["--sigma", "0.1", "--batch", "5", "--accountants", "rdp,gdp"], "unknown gdp"),
        (["--sigma", "0.1", "--batch", "5", "--sampling", "shuffle"], "--sampling 'shuffle' is not known"),
        (["--eps-step", "0.1", "--batch", "5", "--delta", "0.5"], "Theorem 1 is undefined here"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, msg):
    res = run(*args)
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and msg in lines[0], res.output


def test_pld_is_a_choice_and_best_under_poisson_is_the_tightest_poisson_method():
    res = run("--sigma", "0.01", *PAPER, "--accountants", "rdp,pld,rdp_wor", "--sampling", "poisson", "--json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)["totals"][0]
    assert row["eps"]["pld"] == pytest.approx(spent(0.01, 2, 500, 60000, 300, 1e-5, method="pld").eps)
    poisson = {k: row["eps"][k] for k in ("rdp", "pld")}
    assert row["best"] == min(poisson, key=poisson.get) and row["best_eps"] == pytest.approx(min(poisson.values()))
