"""`tuneguard train` through the real CLI entry point."""

from __future__ import annotations

import json

from mlflow import MlflowClient
from typer.testing import CliRunner

from tuneguard.cli import app
from tuneguard.data import DataNotFoundError, load_dataset

runner = CliRunner()
FAST = ["--set", "dataset=mnist", "--set", "steps=3", "--set", "batch_size=8", "--set", "eval_every=3",
        "--set", "n_workers=7", "--set", "f=1"]


def test_dry_run_validates_and_prints_the_plan():
    res = runner.invoke(app, ["train", "configs/fashion_mnist_001.yaml", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "config is valid" in res.output
    assert "sigma" in res.output
    assert "inner epsilon" in res.output or "note:" in res.output  # Theorem 1's invalid regime is flagged


def test_train_runs_and_tracks(tracking_uri, data_dir):
    res = runner.invoke(app, ["train", "configs/mnist_001.yaml", *FAST, "--set", "gar=median",
                              "--tracking-uri", tracking_uri, "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED"
    run = MlflowClient(tracking_uri).get_run(summary["run_id"])
    assert run.data.params["gar.name"] == "median"
    assert run.data.params["batch_size"] == "8"


def test_shipped_configs_are_valid():
    for path in ("configs/fashion_mnist_001.yaml", "configs/mnist_001.yaml", "configs/heterogeneous_sign_003.yaml"):
        res = runner.invoke(app, ["train", path, "--dry-run"])
        assert res.exit_code == 0, (path, res.output)


def test_bad_override_is_one_clear_error():
    res = runner.invoke(app, ["train", "configs/mnist_001.yaml", "--set", "f=20", "--dry-run"])
    assert res.exit_code == 2
    assert "f must be < n_workers" in res.output
    assert "Traceback" not in res.output


def test_missing_data_names_the_options(tmp_path):
    try:
        load_dataset("mnist", tmp_path)
    except DataNotFoundError as err:
        text = str(err)
        assert "--data-dir" in text and "TUNEGUARD_DATA_DIR" in text
    else:
        raise AssertionError("expected DataNotFoundError")


def test_off_a_terminal_progress_is_plain_unwrapped_lines(data_dir, monkeypatch):
    """In a log (no terminal): a plain line per TUNEGUARD_PROGRESS_EVERY seconds (here every step)
    and the last step, each one whole line."""
    monkeypatch.setenv("TUNEGUARD_PROGRESS_EVERY", "0")
    res = runner.invoke(app, ["train", "configs/mnist_001.yaml", *FAST, "--set", "gar=median", "--no-track"])
    assert res.exit_code == 0, res.output
    lines = [x for x in res.output.splitlines() if x.startswith("train step ")]
    assert [x.split()[2] for x in lines] == ["1/3", "2/3", "3/3"], res.output
    assert all("VN " in x and "ETA" in x for x in lines)
