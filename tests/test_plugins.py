"""Your own model and data: import paths, torchvision datasets, validation, and runs through the
real CLI (`tuneguard train`, a 2-trial `tuneguard tune`)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tuneguard.cli import app
from tuneguard.config import ConfigError, build_config
from tuneguard.data import DataNotFoundError, load_dataset, partition
from tuneguard.models import ModelError, build_checked, build_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TESTS = REPO / "tests"
runner = CliRunner()


@pytest.fixture()
def plugin_path(monkeypatch):
    """examples/ and tests/ importable here (custom_model, plugin_fixtures) and in subprocesses."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(EXAMPLES), str(TESTS), os.environ.get("PYTHONPATH", "")]))


# Models ---------------------------------------------------------------------------------------
def test_batchnorm_is_refused_naming_the_layer(plugin_path):
    with pytest.raises(ConfigError) as err:
        build_config({"dataset": "mnist", "model": "plugin_fixtures:bn_net"})
    text = str(err.value)
    assert "layer '0.1' (BatchNorm2d)" in text and "nn.GroupNorm(num_groups, 4)" in text


def test_unknown_models_and_parameters_are_clear_errors(plugin_path):
    cases = {
        "resnet18": "is not a built-in model (mlp_001, mlp_003, logreg, cnn, convnet, resnet_gn)",
        "no_such_pkg.mod:fn": "module 'no_such_pkg.mod' cannot be imported",
        "plugin_fixtures:nope": "has no attribute 'nope'",
    }
    for model, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            build_config({"dataset": "mnist", "model": model})
        assert "Traceback" not in str(err.value)
    with pytest.raises(ConfigError, match=r"model 'convnet' takes model_params channels .* unknown: \['width'\]"):
        build_config({"dataset": "mnist", "model": "convnet", "model_params": {"width": 3}})
    with pytest.raises(ConfigError, match=r"must return logits \[N, num_classes\] = \[N, 10\]"):
        build_config({"dataset": "mnist", "model": "plugin_fixtures:wrong_output"})
    with pytest.raises(ConfigError, match="got an unexpected keyword argument 'depth'"):
        build_config({"dataset": "mnist", "model": "plugin_fixtures:prelu_net", "model_params": {"depth": 2}})


def test_unsupported_layer_falls_back_with_one_line(plugin_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tuneguard"):
        build_checked("plugin_fixtures:prelu_net", 0, (1, 28, 28), 10, {"hidden": 6})
        build_checked("plugin_fixtures:prelu_net", 1, (1, 28, 28), 10, {"hidden": 6})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # once per process, not per build
    assert "layer '2' (PReLU)" in lines[0] and "generic path" in lines[0] and "\n" not in lines[0]


def test_user_models_are_seeded_and_leave_the_global_rng_alone(plugin_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model("custom_model:GNNet", seed=4, input_shape=(1, 12, 12), num_classes=4, params={"width": 4})
    b = build_model("custom_model:GNNet", seed=4, input_shape=(1, 12, 12), num_classes=4, params={"width": 4})
    c = build_model("custom_model:GNNet", seed=5, input_shape=(1, 12, 12), num_classes=4, params={"width": 4})
    assert torch.equal(torch.get_rng_state(), before)
    va, vb, vc = (torch.nn.utils.parameters_to_vector(m.parameters()) for m in (a, b, c))
    assert torch.equal(va, vb) and not torch.equal(va, vc)


def test_builtin_models_follow_the_data_shape():
    m = build_model("mlp_001", input_shape=(3, 8, 8), num_classes=7)
    assert m(torch.zeros(2, 3, 8, 8)).shape == (2, 7)
    assert sum(p.numel() for p in build_model("mlp_001").parameters()) == 79_510  # 001's d on MNIST
    r = build_model("resnet_gn", input_shape=(3, 32, 32), num_classes=100, params={"width": 8})
    assert r(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ModelError, match="needs image inputs"):
        build_model("convnet", input_shape=(5,), num_classes=3)


# Datasets -------------------------------------------------------------------------------------
def test_torchvision_dataset_by_name():
    params = {"size": 60, "image_size": [3, 8, 8], "num_classes": 4}
    data = load_dataset("torchvision:FakeData", params=params)
    assert data.input_shape == (3, 8, 8) and data.train_y.numel() == 50 and data.test_y.numel() == 10
    assert data.num_classes <= 4 and data.train_x.dtype == torch.float32
    # standardised per channel with the train set's statistics
    torch.testing.assert_close(data.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    cfg = build_config({"dataset": "torchvision:FakeData", "dataset_params": params, "model": "resnet_gn"})
    assert cfg.dataset_params == params
    with pytest.raises(ConfigError, match="torchvision.datasets has no dataset class 'CIFAR11'"):
        build_config({"dataset": "torchvision:CIFAR11"})
    with pytest.raises(ConfigError, match=r"takes dataset_params .*unknown: \['colour'\]"):
        build_config({"dataset": "torchvision:FakeData", "dataset_params": {"colour": 1}})


def test_torchvision_dataset_absent_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("torchvision:CIFAR10", tmp_path)
    text = str(err.value)
    assert "--data-dir" in text and "TUNEGUARD_DATA_DIR" in text and "download" in text


def test_callable_dataset_and_every_partition(plugin_path):
    data = load_dataset("custom_model:stripes", params={"n": 600})
    assert data.input_shape == (1, 12, 12) and data.num_classes == 4 and data.train_y.numel() == 500
    vec = load_dataset("plugin_fixtures:blobs")  # (train, test) TensorDatasets of vectors
    assert vec.input_shape == (5,) and vec.num_classes == 3
    for d in (data, vec):
        for kind in ("by_class", "dirichlet"):
            shards = partition(d.train_y, 4, kind, classes_per_worker=2, seed=1)
            joined = torch.cat(shards).sort().values
            assert torch.equal(joined, torch.arange(d.train_y.numel()))  # a partition: no loss, no overlap
        by_class = partition(d.train_y, 4, "by_class", classes_per_worker=2, seed=1)
        assert all(len(set(d.train_y[s].tolist())) == 2 for s in by_class)
    with pytest.raises(ConfigError, match="exceeds the 10 classes of mnist"):
        build_config({"dataset": "mnist", "partition": {"kind": "by_class", "classes_per_worker": 11}})


# Through the CLI ------------------------------------------------------------------------------
def test_train_cli_with_plugin_model_and_dataset(plugin_path, tracking_uri):
    res = runner.invoke(app, [
        "train", "configs/mnist_001.yaml", "--set", "model=custom_model:GNNet", "--set", "model_params.width=4",
        "--set", "dataset=custom_model:stripes", "--set", "dataset_params.n=600", "--set", "f=0",
        "--set", "attack=none", "--set", "n_workers=3", "--set", "batch_size=16", "--set", "steps=4",
        "--set", "eval_every=2", "--set", "lr=0.1", "--set", "momentum=0.9", "--set", "privacy.mode=none",
        "--tracking-uri", tracking_uri, "--json",
    ])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["steps"] == 4
    res = runner.invoke(app, ["train", "configs/mnist_001.yaml", "--set", "model=plugin_fixtures:bn_net", "--dry-run"])
    assert res.exit_code == 2 and "BatchNorm2d" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_two_trial_tune_job_with_plugin_model_and_dataset(plugin_path, tmp_path):
    """A real `tuneguard tune` process (Ray starts there; its trial processes and their actors
    import the plugins through PYTHONPATH), searching over model_params like any other key, on
    the actor engine (the default of tune jobs; f = 0: worker actors only, through shared
    memory): the local engine's numbers."""
    base = {"name": "tg-plugins", "dataset": "custom_model:stripes", "dataset_params": {"n": 600},
            "model": "custom_model:GNNet", "n_workers": 3, "steps": 4, "eval_every": 2, "batch_size": 16,
            "momentum": 0.9, "lr": 0.1, "f": 0, "attack": "none"}
    space = {
        "base": base,  # no engine: tune jobs run on actors
        "scenario": {"privacy": {"mode": "none"}},
        "search": {"model_params.width": [4, 6]},
        "tune": {"mode": "grid", "seed": 0, "scheduler": "none"},
    }
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    exe = str(Path(sys.executable).with_name("tuneguard"))
    # Its output goes to a pipe, as in a CI log: plain lines, a status line per
    # TUNEGUARD_PROGRESS_EVERY seconds (here: every Tune event), nothing wrapped at COLUMNS.
    env = {**os.environ, "RAY_TMPDIR": "/tmp", "TUNEGUARD_HOME": str(tmp_path / "home"),
           "TUNEGUARD_PROGRESS_EVERY": "0", "COLUMNS": "40"}
    res = subprocess.run(
        [exe, "tune", str(space_file), "--results-dir", str(tmp_path / "job"), "--tracking-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", "--num-cpus", "2", "--concurrency", "1"],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout.splitlines()
    assert any(re.match(r"\[1/2\] trial \S+ objective \d", ln) for ln in out), res.stdout
    assert any(re.match(r"\[2/2\] trial \S+ objective \d", ln) for ln in out), res.stdout
    assert any(" running, " in ln and "ETA" in ln for ln in out), res.stdout
    assert any(re.search(r"tuneguard export --job \S+ --tracking-uri \S+ -o best.yaml$", ln) for ln in out), res.stdout
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    from mlflow import MlflowClient

    cl = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = cl.get_experiment_by_name("tg-plugins")
    runs = cl.search_runs([exp.experiment_id], filter_string=f"tags.`tuneguard.job` = '{job['job_id']}' "
                          "and tags.`tuneguard.kind` = 'trial'")
    assert len(runs) == 2
    assert sorted(r.data.params["model_params.width"] for r in runs) == ["4", "6"]
    from tuneguard.training import train

    for r in runs:
        assert r.data.tags["engine"] == "actors" and "tuneguard.actors_warm" in r.data.tags, r.data.tags
        assert r.data.tags["tuneguard.actor_transport"] == "shared_memory", r.data.tags
        width = int(r.data.params["model_params.width"])
        local = train(build_config({**base, "model_params": {"width": width}, "privacy": {"mode": "none"},
                                    "engine": "local"}), track=False)
        history = cl.get_metric_history(r.info.run_id, "param_norm")
        assert max(history, key=lambda m: m.step).value == pytest.approx(local.history[-1]["param_norm"], rel=1e-5)


# The shipped CNN --------------------------------------------------------------------------------
def test_convnet_reaches_97_percent_on_mnist_without_dp(data_dir):
    """The shipped CNN, no noise, no clipping, no attack: >= 97 % test accuracy in 400 steps of
    2 x 64 examples (~30 s on one core)."""
    from tuneguard.training.run import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: 2 threads spin against the neighbours (20x slower)
    try:
        cfg = build_config({
            "dataset": "mnist", "model": "convnet", "n_workers": 2, "f": 0, "attack": "none", "gar": "average",
            "batch_size": 64, "steps": 400, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "clip": None,
            "privacy": {"mode": "none"}, "eval_every": 100,
        })
        result = train(cfg, track=False)
    finally:
        torch.set_num_threads(threads)
    assert result.status == "FINISHED"
    assert result.max_cross_accuracy >= 0.97, result.max_cross_accuracy


def test_list_shows_every_registry():
    """`tuneguard list` names every built-in rule, attack, model and dataset, and how to bring your own."""
    from tuneguard.aggregators import AGGREGATORS
    from tuneguard.attacks import ATTACKS
    from tuneguard.data import DATASETS
    from tuneguard.models import MODELS

    for what, registry, hint in (("aggregators", AGGREGATORS, "nnm+krum"), ("attacks", ATTACKS, None),
                                 ("models", MODELS, "package.module:callable"),
                                 ("datasets", DATASETS, "torchvision:NAME")):
        res = runner.invoke(app, ["list", what], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert all(name in res.output for name in registry), (what, res.output)
        assert hint is None or hint in res.output
