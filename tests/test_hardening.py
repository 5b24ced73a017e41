"""Issue 15: every bad input is one clear error (exit 2, the file/field named, no traceback),
nothing hangs, nothing is silently accepted, names never steer paths, credentials are masked.

One case per class of bad input, run through the real CLI (``python -m tuneguard.cli`` in a
subprocess, so the exit code and stderr are what a user sees) or the library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneguard.config import ConfigError, build_config, load_config
from tuneguard.results.ui import group_alive
from tuneguard.safeyaml import YamlError, loads, scalar
from tuneguard.tune.space import Space, SpaceError

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "mnist_001.yaml")
BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)


def cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneguard.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def assert_clear_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out, out
    assert "error:" in res.stderr, out
    for n in needles:
        assert n in out, (n, out)


# --- tracebacks -------------------------------------------------------------------------------
def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("lr: 0.1\nsteps: [1\n")
    res = cli("train", str(p), "--dry-run")
    assert_clear_error(res, "broken.yaml", "line 3")


def test_binary_file_is_named(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(bytes(range(256)) * 4)
    res = cli("train", str(p), "--dry-run")
    assert_clear_error(res, "model.bin", "binary")


def test_infinite_value_is_refused_in_dry_run():
    res = cli("train", CONFIG, "--set", "clip=.inf", "--dry-run")
    assert_clear_error(res, "clip", "finite")


def test_device_cuda_without_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = cli("train", CONFIG, "--set", "device=cuda", "--no-track")
    assert_clear_error(res, "device='cuda'", "no usable CUDA GPU")


def test_corrupt_job_json_on_resume(tmp_path):
    (tmp_path / "job.json").write_text("{not json")
    res = cli("tune", "--resume", str(tmp_path))
    assert_clear_error(res, "job.json")


def test_tracking_uri_pointing_at_a_non_database(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, not a database\n")
    res = cli("train", CONFIG, "--set", "steps=1", "--tracking-uri", f"sqlite:///{p}")
    assert_clear_error(res, "not a SQLite database")


def test_ui_port_out_of_range():
    res = cli("ui", "--port", "-1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--port" in res.stderr


def test_export_to_a_directory(tmp_path, tracking_uri):
    res = cli("export", "-o", str(tmp_path), "--tracking-uri", tracking_uri)
    assert_clear_error(res, "is a directory")


def test_space_with_missing_data_dir(tmp_path):
    p = tmp_path / "space.yaml"
    p.write_text(f"base: {{dataset: mnist, data_dir: {tmp_path / 'nowhere'}, steps: 2}}\nsearch: {{lr: [0.1, 0.2]}}\n")
    res = cli("tune", str(p), "--dry-run")
    assert_clear_error(res, "base.data_dir", "does not exist")


# --- hangs ------------------------------------------------------------------------------------
def test_alias_bomb_in_a_config_is_refused_fast(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(BOMB.replace("i: &i", "lr: &i"))
    start = time.monotonic()
    res = cli("train", str(p), "--dry-run", timeout=60)
    assert_clear_error(res, "bomb.yaml", "aliases")
    assert time.monotonic() - start < 30


def test_alias_bomb_in_a_space_is_refused_fast():
    start = time.monotonic()
    with pytest.raises(SpaceError, match="expands to more than"):
        Space.from_text(BOMB.replace("a: &a", "description: x\nbase: {name: &a").replace('"lol"]\n', '"lol"]}\n', 1))
    assert time.monotonic() - start < 5


def test_unreachable_mlflow_server_fails_within_seconds():
    start = time.monotonic()
    res = cli("train", CONFIG, "--set", "steps=1", "--tracking-uri", "http://127.0.0.1:1")
    assert_clear_error(res, "no MLflow server answers at http://127.0.0.1:1")
    assert time.monotonic() - start < 60  # the process start is most of it


# --- silently accepted --------------------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ("lr=.inf", "lr"),
    ("steps=1e12", "steps"),
    ("steps=99999999999999999999", "steps"),
    ("n_workers=true", "n_workers"),
    ("n_workers=3000000", "n_workers"),
    ("device=nonsense", "device"),
    ("attack.params.zeta=abc", "zeta"),
    ("name=bad\u202ename", r"U\+202E"),
])
def test_bad_values_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config({}, [override])


def test_memory_estimate_refuses_absurd_worker_counts():
    with pytest.raises(ConfigError, match="GiB of memory"):
        build_config({}, ["gar=median", "n_workers=90000"])


def test_duplicate_keys_are_an_error(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("lr: 0.1\nsteps: 5\nlr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(p)


def test_empty_space_is_refused(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing here\n")
    res = cli("tune", str(p), "--dry-run")
    assert_clear_error(res, "empty")


def test_set_accepts_numbers_as_people_write_them():
    assert scalar("1e30") == 1e30 and isinstance(scalar("1e-3"), float)
    assert build_config({}, ["lr=1e-3"]).lr == 1e-3
    assert loads("a: 1e-5")["a"] == 1e-5


def test_json_output_is_strict(data_dir):
    # a budget no step fits: the run is INFEASIBLE (exit 3) and its accuracies are NaN; --json
    # must print null, not a bare NaN
    res = cli("train", CONFIG, "--set", "privacy.mode=total", "--set", "privacy.total_eps=1e-9",
              "--set", "privacy.adapt=steps", "--no-track", "--json")
    assert res.returncode == 3, res.stdout + res.stderr
    text = res.stdout.strip().splitlines()[-1]
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in --json output"))
    assert summary["status"] == "INFEASIBLE" and summary["max_cross_accuracy"] is None


def test_yaml_errors_are_value_errors():
    with pytest.raises(YamlError, match="recursive"):
        loads("a: &x [*x]\n")


# --- security -----------------------------------------------------------------------------------
def test_experiment_name_cannot_steer_artifact_paths(tmp_path, data_dir):
    """`--set name=../../x` must not write outside $TUNEGUARD_HOME (the path-escape test)."""
    home = tmp_path / "deep" / "er" / "home"
    res = cli("train", CONFIG, "--set", "name=../../escaped", "--set", "steps=2", "--set", "eval_every=2",
              "--set", "n_workers=5", "--set", "f=1", "--set", "gar=median", "--set", "batch_size=8",
              env={"TUNEGUARD_HOME": str(home), "MLFLOW_TRACKING_URI": ""})
    assert res.returncode == 0, res.stderr
    outside = [p for p in tmp_path.rglob("*") if home not in p.parents and p != home and p not in home.parents]
    assert outside == [], outside
    from mlflow import MlflowClient

    exp = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_experiment_by_name("../../escaped")
    assert exp is not None
    root = (home / "artifacts").resolve()
    assert Path(exp.artifact_location.removeprefix("file://")).resolve().parent == root
    assert any((home / "artifacts").rglob("config.yaml"))


def test_credentials_in_tracking_uri_are_masked():
    from tuneguard.tracking import mask_uri

    assert mask_uri("http://alice:s3cret@mlflow.example:5000") == "http://alice:***@mlflow.example:5000"
    assert mask_uri("https://tok123@host/x") == "https://***@host/x"
    assert mask_uri("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    res = cli("train", CONFIG, "--set", "steps=1", "--tracking-uri", "http://alice:s3cret@127.0.0.1:1")
    assert_clear_error(res, "alice:***@127.0.0.1:1")
    assert "s3cret" not in res.stdout + res.stderr


def test_resume_refuses_a_dir_tuneguard_did_not_write(tmp_path):
    """A job dir whose tuner.pkl is not the one recorded in job.json is refused before
    Tuner.restore can unpickle it."""
    from tuneguard.tune.jobfile import job_digest

    rdir = tmp_path / "job"
    (rdir / "tune").mkdir(parents=True)
    (rdir / "space.yaml").write_text("base: {dataset: mnist, steps: 2}\nsearch: {lr: [0.1, 0.2]}\n")
    (rdir / "tune" / "tuner.pkl").write_bytes(b"written by tuneguard")
    job = {"job_id": "j1", "results_dir": str(rdir), "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
           "experiment": "x", "parent_run_id": "r", "study_name": "j1", "space_path": None, "created": 1.0,
           "checkpoint_every": 1, "total_trials": 2, "digest": job_digest(rdir)}
    (rdir / "job.json").write_text(json.dumps(job))
    (rdir / "tune" / "tuner.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # swapped in
    res = cli("tune", "--resume", str(rdir))
    assert_clear_error(res, "do not match the digest", "trusted code")
    job.pop("digest")
    (rdir / "job.json").write_text(json.dumps(job))
    res = cli("tune", "--resume", str(rdir))
    assert_clear_error(res, "records no digest")


def test_ui_sigint_during_startup_stops_the_whole_server_group(tmp_path, tracking_uri):
    """Ctrl-C in the seconds before the URL appears: no mlflow server or uvicorn is left behind."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TUNEGUARD_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "tuneguard.cli", "ui", "--tracking-uri", tracking_uri,
                             "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    server_log = tmp_path / "home" / "ui.log"
    deadline = time.monotonic() + 60
    pgid = None
    while time.monotonic() < deadline and pgid is None:  # the server process exists, not yet ready
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if "server" in cmd and f"--port {port}" in cmd and int(stat[1]) != proc.pid:
                    pgid = int(stat[2])  # its own process group
                    break
        time.sleep(0.1)
    assert pgid is not None, "mlflow server did not start"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert "Traceback" not in out, out
    assert "MLflow UI for" not in out  # stopped before it was ready
    deadline = time.monotonic() + 20
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(pgid), f"processes of group {pgid} left running; log: {server_log}"
