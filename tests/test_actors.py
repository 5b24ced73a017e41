"""The Ray actor engine on a real local Ray cluster (one for the module, 2 CPUs): same numbers as
the local engine, recovery from dead and hung worker actors, Ray Tune trials, no orphans.

Each engine start costs a few seconds per actor (every actor imports torch), so the cases below
cover GAR x attack x DP x grouping pairwise instead of as a full product.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import ray
import torch

from tuneguard.config import build_config
from tuneguard.raycluster import RayConnection, connect, resolve_address
from tuneguard.training import train
from tuneguard.training.actors import (
    ActorEngine,
    WorkerLost,
    default_worker_actors,
    plan_layout,
    shutdown_warm,
    trial_resources,
    warm_pool,
)
from tuneguard.training.context import build_context
from tuneguard.training.local import LocalEngine

BASE = dict(dataset="mnist", n_workers=5, f=1, batch_size=16, steps=4, eval_every=2, lr=0.1, momentum=0.9)
TOL = 1e-5
SAMPLE_TOL = 1e-4


def cfg_of(**over):
    raw = {**BASE, **over}
    raw.setdefault("engine", "actors")
    return build_config(raw)


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    yield ray_local
    # Only this process's warm pool outlives its engines, and it goes with shutdown_warm().
    shutdown_warm()
    assert _our_actors() == []


def _our_actors() -> list[str]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if (a["name"] if isinstance(a, dict) else a).startswith("tuneguard-")]


def run_steps(engine, steps: int):
    state = engine.init_state()
    history = []
    for t in range(steps):
        state, m = engine.step(state, t)
        history.append(m)
    return engine.export_state(state), history, engine.evaluate(state)


def local_reference(cfg):
    local = build_config({**cfg.model_dump(mode="json"), "engine": "local"})
    return run_steps(LocalEngine(build_context(local)), cfg.steps)


def assert_same(a, b):
    (sa, ha, ea), (sb, hb, eb) = a, b
    for key in ("theta", "momentum", "byz_momentum"):
        if sa[key] is None or sb[key] is None:
            assert sa[key] is None and sb[key] is None, key
        else:
            assert sa[key].shape == sb[key].shape, key
            assert torch.allclose(sa[key], sb[key], atol=TOL, rtol=0), (key, (sa[key] - sb[key]).abs().max())
    assert len(ha) == len(hb)
    for ma, mb in zip(ha, hb, strict=True):
        assert ma.keys() == mb.keys()
        for k in ma:
            # The "sample" VN statistics come from the actors' per-group moments: the same sums
            # in another order, equal to fp32 accumulation error over d ~ 80k (~1e-5), not bitwise.
            tol = SAMPLE_TOL if k in ("vn_sample", "noise_share") else TOL
            assert ma[k] == pytest.approx(mb[k], abs=tol, rel=tol), (k, ma[k], mb[k])
    assert ea == pytest.approx(eb, abs=TOL)


# Equivalence -------------------------------------------------------------------------------
# GAR x attack in full; DP and grouping (1 worker per actor / several) so that every pair of
# levels of any two of the four factors occurs.
# Every case but one goes through the same-node shared-memory channel (the default transport);
# one through Ray's object store.
CASES = [
    ("median", "little", "per_step", 1, "auto"),
    ("median", "empire", "none", 3, "auto"),
    ("krum", "little", "none", None, "auto"),  # the default grouping (one actor per core)
    ("krum", "empire", "per_step", 3, "object_store"),
    ("krum", "empire", "none", 1, "auto"),
]


@pytest.mark.parametrize(("gar", "attack", "privacy", "wpa", "transport"), CASES)
@pytest.mark.slow
def test_same_numbers_as_local_engine(ray_cluster, data_dir, gar, attack, privacy, wpa, transport):
    cfg = cfg_of(gar=gar, attack=attack, privacy={"mode": privacy},
                 actors={"workers_per_actor": wpa, "transport": transport})
    with ActorEngine(cfg) as engine:
        assert len(engine.actor_names()) == len(engine.layout.groups) + 1  # workers, Byzantine (this process serves)
        sizes = [len(g) for g in engine.layout.groups]
        if wpa is None:  # the default: one worker actor per core
            assert len(sizes) == default_worker_actors(cfg.n_honest) and max(sizes) - min(sizes) <= 1
        else:
            assert sizes == ([1] * 4 if wpa == 1 else [3, 1])
        assert (engine.plan.sigma > 0) == (privacy == "per_step")
        got = run_steps(engine, cfg.steps)
        names = set(engine.actor_names())
        assert engine.transport == ("shared_memory" if transport == "auto" else "object_store")
        assert engine.transport_log == []
    # Inside a Ray connection the engine does not own, its actors stay warm for the next run.
    assert {a["name"] for a in _our_actors()} == names and warm_pool() is not None
    assert_same(got, local_reference(cfg))


@pytest.mark.slow
def test_warm_actors_are_reset_not_restarted_between_runs(ray_cluster, data_dir):
    """A second run with the same layout (another seed, attack, GAR and privacy) takes the first
    run's actors, reset: no new process, and the local engine's numbers for the new config."""
    first = cfg_of(gar="median", attack="little", privacy={"mode": "per_step"}, actors={"workers_per_actor": 2})
    second = cfg_of(gar="krum", attack="empire", privacy={"mode": "none"}, seed=7, momentum=0.5,
                    actors={"workers_per_actor": 2})
    with ActorEngine(first) as engine:
        run_steps(engine, 2)
        pids = {k: v["pid"] for k, v in engine.actor_memory().items()}
        started = engine.pool.started
    with ActorEngine(second) as engine:
        assert engine.reused and engine.pool.started == started
        assert {k: v["pid"] for k, v in engine.actor_memory().items()} == pids
        assert all(v["resets"] == 2 for v in engine.actor_memory().values())
        got = run_steps(engine, second.steps)
    assert_same(got, local_reference(second))
    # A layout that differs (another grouping) replaces the warm pool.
    with ActorEngine(cfg_of(actors={"workers_per_actor": 4})) as engine:
        assert not engine.reused and set(engine.actor_memory()) != set(pids)
    assert len(_our_actors()) == 2  # the old pool is gone: one worker actor + the Byzantine actor


@pytest.mark.slow
def test_train_loop_label_flip_and_resume_match_local(ray_cluster, data_dir):
    """The whole train() loop (evaluation, history) with the label-flipping Byzantine actor (it
    trains on flipped labels with its own momentum), and a checkpoint/resume through
    export_state / import_state, give the local engine's numbers."""
    cfg = cfg_of(gar="median", attack="label_flip", privacy={"mode": "per_step"}, actors={"workers_per_actor": 4})
    ref = train(build_config({**cfg.model_dump(mode="json"), "engine": "local"}), track=False)
    saved = []
    with ActorEngine(cfg) as engine:
        got = train(cfg, track=False, engine=engine, checkpoint_fn=saved.append, checkpoint_every=2)
        assert [ck["step"] for ck in saved] == [2]
        assert saved[0]["state"]["byz_momentum"].shape == (cfg.f, engine.d)
        resumed = train(cfg, track=False, engine=engine, resume=saved[0])
    for run in (got, resumed):
        assert run.status == ref.status == "FINISHED"
        assert len(run.history) == len(ref.history) == cfg.steps
        for ma, mb in zip(run.history, ref.history, strict=True):
            assert ma.keys() == mb.keys()
            for k in ma:
                assert ma[k] == pytest.approx(mb[k], abs=TOL, rel=TOL), k
    shutdown_warm()
    assert _our_actors() == []


@pytest.mark.slow
def test_concurrent_runs_share_the_warm_actors(ray_cluster, data_dir):
    """Two runs at once (as a Tune trial runs its attacks) go through one set of actors, each
    with its own context on them, and each gives the local engine's numbers; a worker actor
    killed under them is replaced once (by whichever run saw it first) and both runs recover."""
    import threading

    shutdown_warm()
    a = cfg_of(gar="median", attack="little", privacy={"mode": "per_step"}, steps=5, actors={"workers_per_actor": 2})
    b = cfg_of(gar="krum", attack="empire", privacy={"mode": "none"}, seed=7, steps=5, actors={"workers_per_actor": 2})
    engines = [ActorEngine(a), ActorEngine(b)]
    results, errors = {}, []

    def go(i, cfg):
        try:
            state, history = engines[i].init_state(), []
            for t in range(cfg.steps):
                state, m = engines[i].step(state, t)
                history.append(m)
                if i == 0 and t == 1:
                    engines[0]._kill_worker_for_test(0)
            results[i] = (engines[i].export_state(state), history, engines[i].evaluate(state))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    try:
        pool = engines[0].pool
        assert engines[1].pool is pool and engines[1].reused and pool.users == 2
        started = pool.started
        threads = [threading.Thread(target=go, args=(i, c)) for i, c in enumerate((a, b))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        assert not errors, errors
        assert pool.started == started + 1  # one replacement for both runs
        assert engines[0].restarts + engines[1].restarts == 1
    finally:
        for e in engines:
            e.close()
    assert_same(results[0], local_reference(a))
    assert_same(results[1], local_reference(b))
    assert warm_pool() is pool and pool.users == 0 and pool.alive()  # warm for the next run
    shutdown_warm()
    assert _our_actors() == []


# Faults ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dead_and_hung_workers_are_replaced_then_the_run_stops_by_name(ray_cluster, data_dir, tracking_uri):
    cfg = cfg_of(gar="median", attack="little", steps=5, eval_every=5,
                 actors={"workers_per_actor": 2, "max_restarts": 1, "step_timeout_s": 5})
    ref = train(build_config({**cfg.model_dump(mode="json"), "engine": "local"}), track=False)
    engine = ActorEngine(cfg, warm=False)
    try:
        # 1. A worker actor killed after step 2 (as an OOM kill would), the Byzantine actor after
        #    step 4: restarted, momentum restored, same numbers.
        victim = engine.worker_actors[0]

        def kill(m):
            if m["step"] == 2:
                engine._kill_worker_for_test(0)
            if m["step"] == 4:
                ray.kill(engine.byzantine_actor, no_restart=True)
        got = train(cfg, tracking_uri=tracking_uri, engine=engine, callback=kill)
        assert got.status == "FINISHED"
        # The restarts are on the run's MLflow record.
        from mlflow import MlflowClient

        run = MlflowClient(tracking_uri).get_run(got.run_id)
        assert run.data.tags["tuneguard.actor_restarts"] == "2" and run.data.metrics["actor_restarts"] == 2
        assert "honest-worker actor 0" in run.data.tags["tuneguard.actor_restart_log"]
        assert [h["param_norm"] for h in got.history] == pytest.approx([h["param_norm"] for h in ref.history], abs=TOL)
        assert got.final_cross_accuracy == pytest.approx(ref.final_cross_accuracy, abs=TOL)
        assert engine.worker_actors[0] is not victim
        assert any("honest-worker actor 0" in line and "died" in line for line in engine.restart_log)
        # Each death broke the shared-memory channel: that step went through the object store,
        # and the next steps through new channels.
        assert run.data.tags["tuneguard.actor_transport"] == "shared_memory (3 steps), object_store (2 steps)"
        assert len(engine.transport_log) == 2 and "channel broke" in engine.transport_log[0]
        assert any("Byzantine actor" in line and "died" in line for line in engine.restart_log)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(victim.ready.remote(), timeout=30)

        # 2. Hung (its computation stalls past actors.step_timeout_s: it holds the actor's lock,
        #    which a step on either transport needs): killed, restarted once, same numbers.
        def hang(m):
            if m["step"] == 3:
                engine.worker_actors[1].__ray_call__.remote(
                    lambda self: [self.lock.acquire(), time.sleep(60), self.lock.release()])
        got = train(cfg, track=False, engine=engine, callback=hang)
        assert got.status == "FINISHED"
        assert got.history[-1]["param_norm"] == pytest.approx(ref.history[-1]["param_norm"], abs=TOL)
        assert any("honest-worker actor 1" in line and "hung" in line for line in engine.restart_log)

        # 3. Killed again: its restart budget (max_restarts=1) is spent, the run stops by name.
        with pytest.raises(WorkerLost, match=r"honest-worker actor 0 \(worker ids 0, 1\).*max_restarts=1") as info:
            train(cfg, track=False, engine=engine, callback=lambda m: m["step"] == 1 and engine._kill_worker_for_test(0))
        assert info.value.workers == [0, 1]
        assert isinstance(info.value, RuntimeError)
    finally:
        engine.close()
    assert _our_actors() == []


@pytest.mark.slow
def test_restarts_disabled_fails_fast_naming_the_worker(ray_cluster, data_dir):
    cfg = cfg_of(steps=3, actors={"workers_per_actor": 4, "max_restarts": 0})
    shutdown_warm()
    engine = ActorEngine(cfg)  # warm by default, but a failed run's actors are not kept
    handles = [*engine.worker_actors, engine.byzantine_actor]
    start = time.perf_counter()
    with pytest.raises(WorkerLost, match=r"honest-worker actor 0 \(worker ids 0-3\).*restarts are disabled"):
        train(cfg, track=False, engine=engine, callback=lambda m: m["step"] == 1 and engine._kill_worker_for_test(0))
    assert time.perf_counter() - start < 60
    engine.close()
    engine.close()  # idempotent
    assert _our_actors() == []
    for h in handles:  # every actor of the run is dead
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(h.ready.remote(), timeout=30)


# Ray Tune ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_concurrent_tune_trials_on_two_cpus(ray_cluster, data_dir, tmp_path):
    from ray import tune

    # 1 worker actor + the trainable's bundle (the trainable is the parameter server).
    cfg = cfg_of(n_workers=3, f=0, attack="none", gar="average", steps=3, eval_every=3)
    assert plan_layout(cfg, cpus=1).n_actors == 1
    pgf = trial_resources(cfg, cpus=1)
    assert len(pgf.bundles) == 2
    assert sum(b["CPU"] for b in pgf.bundles) <= 1.0  # two trials fit on 2 CPUs
    raw = cfg.model_dump(mode="json")

    def trainable(config):
        start = time.time()
        run_cfg = build_config({**raw, "seed": config["seed"]})
        engine = ActorEngine(run_cfg)  # what train(run_cfg) builds; made here to look at it
        try:
            result = train(run_cfg, track=False, engine=engine)
            pg = engine.placement_group
            in_pg = pg is not None and pg.id == ray.util.get_current_placement_group().id
        finally:
            engine.close()
        tune.report({"acc": result.max_cross_accuracy, "steps": result.steps, "in_trial_pg": in_pg,
                     "start": start, "end": time.time()})

    tuner = tune.Tuner(
        tune.with_resources(trainable, pgf),
        param_space={"seed": tune.grid_search([1, 2])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="actors", verbose=0),
    )
    results = tuner.fit()
    assert results.num_errors == 0, [r.error for r in results]
    assert sorted(r.metrics["steps"] for r in results) == [3, 3]
    assert all(0 <= r.metrics["acc"] <= 1 and r.metrics["in_trial_pg"] for r in results)
    a, b = (r.metrics for r in results)
    assert a["start"] < b["end"] and b["start"] < a["end"], "the two trials did not run concurrently"


def test_trial_resources_match_the_engine_layout():
    cfg = cfg_of(n_workers=15, f=3, actors={"workers_per_actor": None, "cpus_per_actor": 0.1})
    pgf = trial_resources(cfg, cpus=4)
    assert len(pgf.bundles) == 1 + 4 + 1  # driver (the server), one worker actor per core, Byzantine
    assert all(b == {"CPU": 0.1} for b in pgf.bundles)
    assert default_worker_actors(12, 2) == 2 and default_worker_actors(3, 16) == 3
    layout = plan_layout(cfg, n_worker_actors=5, gpu=False)
    assert [len(g) for g in layout.groups] == [3, 3, 2, 2, 2]
    assert [w for g in layout.groups for w in g] == list(range(12))
    one = plan_layout(cfg_of(n_workers=12, f=0, attack="none", actors={"workers_per_actor": 12}), gpu=True)
    assert one.n_actors == 1 and not one.byzantine and one.gpus == 0.5  # the driver and the worker actor


# Ray connection ----------------------------------------------------------------------------
def test_connect_reuses_a_running_ray(ray_cluster):
    conn = connect()
    assert conn.mode == "reused" and not conn.owned
    conn.close()
    assert ray.is_initialized()  # a reused connection is never shut down


def test_resolve_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None
    assert resolve_address("local") is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address(None) == "10.0.0.1:6379"
    assert resolve_address("auto") == "auto"
    assert RayConnection("local", None).owned


def test_unreachable_address_fails_fast_with_advice(tmp_path):
    code = ("from tuneguard.raycluster import connect, RayConnectError\n"
            "try:\n    connect('127.0.0.1:9')\nexcept RayConnectError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "RAY_ADDRESS": ""}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert time.perf_counter() - start < 60
    assert "ERR no Ray cluster answers at '127.0.0.1:9'" in out.stdout, out.stderr[-2000:]
    assert "private local cluster" in out.stdout


def test_missing_token_file_is_created_for_a_private_cluster(tmp_path, monkeypatch):
    from tuneguard.raycluster import _ensure_token_file, _join_failure_message

    path = tmp_path / "sub" / "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    _ensure_token_file()
    assert len(path.read_text()) == 64 and (path.stat().st_mode & 0o777) == 0o600
    token = path.read_text()
    _ensure_token_file()
    assert path.read_text() == token  # an existing token is kept
    msg = _join_failure_message("10.0.0.1:6379", "10.0.0.1:6379", ConnectionError("boom"))
    assert "RAY_AUTH_MODE=token" in msg and "RAY_AUTH_MODE=disabled" in msg and str(path) in msg


def test_actors_that_cannot_fit_fail_at_once_with_advice(ray_cluster, data_dir):
    cfg = cfg_of(n_workers=15, f=3, actors={"workers_per_actor": 1, "cpus_per_actor": 0.25})
    shutdown_warm()
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"13 actors x actors.cpus_per_actor=0.25 = 3.25 CPUs.*has 2"):
        ActorEngine(cfg)
    assert time.perf_counter() - start < 30
    assert _our_actors() == []
