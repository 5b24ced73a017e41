"""The driver's link to its Tune callbacks (tuneguard/tune/driver.py), on a real Ray Tune: a job
restored with ``Tuner.restore`` runs with the resuming driver's own callbacks (its console, its
failure guard), not the copies Tune pickled when the job was created. A trivial trainable keeps
it to seconds; tests/test_tune_job.py resumes a real job after killing its driver."""

from __future__ import annotations

import io
import pickle

import yaml
from rich.console import Console

from tuneguard.tune.driver import DriverSettings, restoring
from tuneguard.tune.failures import FailureGuard
from tuneguard.tune.progress import JobTracker, ProgressView

SPACE = yaml.safe_dump({"base": {"dataset": "mnist", "n_workers": 5, "f": 1, "attack": "little"},
                        "search": {"lr": [0.1, 0.2]}, "tune": {"num_samples": 2}})


def _callbacks(out: io.StringIO, limit: int = 2) -> tuple[ProgressView, FailureGuard]:
    return ProgressView(SPACE, None, "job-1", 2, DriverSettings(Console(file=out, width=200))), FailureGuard(limit)


def test_a_restored_job_runs_with_the_resuming_drivers_callbacks(ray_local, tmp_path):
    from ray import tune

    def _trainable(config):  # defined here: Ray ships it by value (workers cannot import tests/)
        raise RuntimeError("the same error every time")

    # The first driver runs the job: its one trial fails, seen by this driver's guard and view.
    first_out = io.StringIO()
    view1, guard1 = _callbacks(first_out, limit=5)
    tune.Tuner(_trainable, run_config=tune.RunConfig(name="job", storage_path=str(tmp_path), verbose=0,
                                                     callbacks=[view1, guard1], stop=guard1)).fit()
    assert guard1.first is not None and first_out.getvalue().count("failed; details:") == 1

    # A second driver restores it and retries the trial with its own callbacks (its guard stops
    # at the first failure), not the copies Tune pickled when the job was created.
    out = io.StringIO()
    view, guard = _callbacks(out, limit=1)
    with restoring([view, guard]):
        tuner = tune.Tuner.restore(str(tmp_path / "job"), trainable=_trainable, restart_errored=True)
    assert tuner.fit().num_errors == 1
    assert guard.first is not None and guard.reason is not None and "1 trials failed" in guard.reason
    assert out.getvalue().count("failed; details:") == 1, out.getvalue()
    assert first_out.getvalue().count("failed; details:") == 1 and guard1.reason is None


def test_outside_a_restore_a_callback_unpickles_as_a_copy_without_the_console():
    view, guard = _callbacks(io.StringIO(), limit=5)
    tracker = JobTracker("sqlite:///mlflow.db", "run-1", SPACE, None)
    guard.reason = "seen"
    copies = pickle.loads(pickle.dumps([view, tracker, guard, guard]))
    assert copies[2] is copies[3] and copies[2] is not guard and copies[2].reason == "seen" and copies[2].limit == 5
    assert copies[0].driver == DriverSettings(None, progress=True, concurrency=1) and copies[0]._runtime is None
    assert view.driver.console is not None  # the original keeps its console
    assert copies[1].tracking_uri == tracker.tracking_uri
    with restoring([guard]):  # only the slots the driver hands over are bound
        bound = pickle.loads(pickle.dumps([view, guard]))
    assert bound[1] is guard and bound[0] is not view


def test_the_tracker_pickles_no_credentials():
    """Tune writes the callbacks into tuner.pkl on disk: the job tracker's copy carries the URI
    masked, while a resumed job binds the resuming driver's tracker (the URI given again)."""
    uri = "http://alice:s3cret@mlflow.example:5000"
    tracker = JobTracker(uri, "parent-run", SPACE, None)
    blob = pickle.dumps(tracker)
    assert b"s3cret" not in blob
    assert pickle.loads(blob).tracking_uri == "http://alice:***@mlflow.example:5000"
    with restoring([tracker]):
        assert pickle.loads(blob) is tracker and tracker.tracking_uri == uri
