"""Training runs end to end on the real datasets, through the public API, logged to a real
MLflow SQLite store."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient

from tuneguard.aggregators import AGGREGATORS
from tuneguard.attacks import ATTACKS
from tuneguard.config import ConfigError, build_config
from tuneguard.training import train
from tuneguard.training.context import build_context
from tuneguard.training.local import LocalEngine

SMALL = dict(dataset="mnist", n_workers=7, f=1, batch_size=8, steps=3, eval_every=3, lr=0.1, momentum=0.9)


def small(**over):
    cfg = dict(SMALL)
    cfg.update(over)
    return build_config(cfg)


def assert_finite_history(result):
    assert result.status == "FINISHED", result.message
    assert result.steps == result.planned_steps
    for m in result.history:
        for key in ("train_loss", "vn_sample", "vn_submit", "grad_norm", "param_norm"):
            assert math.isfinite(m[key]), (key, m)
    assert 0 <= result.final_cross_accuracy <= 1


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("private", [True, False])
def test_short_run_logs_to_mlflow(dataset, private, tracking_uri, data_dir):
    cfg = small(dataset=dataset, privacy={"mode": "per_step" if private else "none"}, gar="median", attack="little")
    result = train(cfg, tracking_uri=tracking_uri)
    assert_finite_history(result)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["gar.name"] == "median"
    assert run.data.tags["dataset"] == dataset
    history = client.get_metric_history(result.run_id, "vn_submit")
    assert [h.step for h in history] == [1, 2, 3]
    assert {"cross_accuracy", "max_cross_accuracy", "vn_sample", "train_loss"} <= set(run.data.metrics)
    if private:
        assert result.sigma > 0 and run.data.metrics["eps_spent"] > 0
    else:
        assert result.sigma == 0 and "eps_spent" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {
        a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"config.yaml", "plots/curves.png"} <= artifacts


ROBUST_GARS = [g for g, spec in AGGREGATORS.items() if not spec.is_pre]


@pytest.mark.parametrize("gar", ROBUST_GARS)
def test_every_gar_trains(gar, data_dir):
    f = 1
    n = max(7, AGGREGATORS[gar].min_n(f))
    result = train(small(gar=gar, n_workers=n, f=f), track=False)
    assert_finite_history(result)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_trains(attack, data_dir):
    params = {"gar": "median"} if attack == "adaptive" else {}
    result = train(small(attack={"name": attack, "params": params}, gar="median"), track=False)
    assert_finite_history(result)


def test_pre_aggregation_chain_trains(data_dir):
    assert_finite_history(train(small(gar="nnm+krum"), track=False))
    assert_finite_history(train(small(gar={"name": "bucketing+median", "params": {"s": 2}}), track=False))


def test_mnist_learns_without_attack_or_noise(data_dir):
    cfg = build_config(dict(dataset="mnist", n_workers=5, f=0, attack="none", gar="average", batch_size=32,
                            steps=40, eval_every=20, lr=0.1, momentum=0.9, privacy={"mode": "none"}))
    result = train(cfg, track=False)
    assert result.max_cross_accuracy > 0.7  # chance is 0.1


def test_empire_hurts_average_more_than_median(data_dir):
    common = dict(dataset="mnist", n_workers=15, f=6, attack={"name": "empire", "params": {"zeta": 5.0}},
                  batch_size=32, steps=30, eval_every=10, lr=0.1, momentum=0.9, privacy={"mode": "none"})
    avg = train(build_config({**common, "gar": "average"}), track=False)
    med = train(build_config({**common, "gar": "median"}), track=False)
    assert med.max_cross_accuracy > avg.max_cross_accuracy + 0.2


def test_nan_attack_does_not_stop_a_robust_run(data_dir):
    for attack in ("nan", "inf"):
        result = train(small(attack=attack, gar="krum"), track=False)
        assert_finite_history(result)


def test_divergence_is_a_status_not_a_crash(tracking_uri, data_dir):
    result = train(small(gar="average", attack="inf"), tracking_uri=tracking_uri)
    assert result.status == "DIVERGED"
    assert "non-finite" in result.message
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.data.tags["tuneguard.status"] == "DIVERGED"


def test_same_seed_same_numbers(data_dir):
    cfg = small(steps=4, eval_every=2)
    a, b = train(cfg, track=False), train(cfg, track=False)
    assert [m["train_loss"] for m in a.history] == [m["train_loss"] for m in b.history]
    assert a.final_cross_accuracy == b.final_cross_accuracy
    c = train(small(steps=4, eval_every=2, seed=2), track=False)
    assert [m["train_loss"] for m in a.history] != [m["train_loss"] for m in c.history]


@pytest.mark.parametrize("attack", ["little", "label_flip"])
def test_worker_grouping_does_not_change_numbers(attack, data_dir):
    cfg = small(steps=4, attack=attack)
    h = cfg.n_honest
    one = LocalEngine(build_context(cfg))
    split = LocalEngine(build_context(cfg), worker_groups=[[4, 0, 2], [1, 3, 5][: h - 3]])
    s1, s2 = one.init_state(), split.init_state()
    for t in range(cfg.steps):
        s1, m1 = one.step(s1, t)
        s2, m2 = split.step(s2, t)
        assert m1["train_loss"] == pytest.approx(m2["train_loss"], abs=1e-5)
    torch.testing.assert_close(s1.theta, s2.theta, atol=1e-5, rtol=0)
    torch.testing.assert_close(s1.momentum, s2.momentum, atol=1e-5, rtol=0)


def test_resume_from_checkpoint_matches_uninterrupted(tracking_uri, data_dir):
    cfg = small(steps=6, eval_every=2)
    full = train(cfg, track=False)
    saved = []
    train(cfg, track=False, checkpoint_fn=saved.append, checkpoint_every=3)
    assert [c["step"] for c in saved] == [3]
    resumed = train(cfg, track=False, resume=saved[0])
    assert resumed.final_cross_accuracy == full.final_cross_accuracy
    assert [m["train_loss"] for m in resumed.history] == pytest.approx([m["train_loss"] for m in full.history], abs=1e-6)


def test_heterogeneous_noisy_sign_sgd(data_dir):
    cfg = build_config(dict(dataset="mnist", model="mlp_003", n_workers=10, f=0, attack="none", gar="sign_majority",
                            batch_size=16, steps=5, eval_every=5, lr=0.001, momentum=0.0, weight_decay=0.0,
                            clip=None, privacy={"mode": "none"}, perturbation=0.01,
                            partition={"kind": "by_class", "classes_per_worker": 1}))
    result = train(cfg, track=False)
    assert_finite_history(result)


def test_cnn_uses_the_generic_clipping_path(data_dir):
    assert_finite_history(train(small(model="cnn", steps=2, eval_every=2), track=False))


def test_total_budget_adapts_steps(data_dir):
    from tuneguard.privacy import spent, theorem1_sigma

    sigma = theorem1_sigma(0.2, 1e-5, 2.0, 100, 60_000)
    budget = spent(sigma, 2.0, 100, 60_000, 12, 1e-5, method="rdp_wor").eps
    cfg = small(steps=50, eval_every=4, batch_size=100,
                privacy={"mode": "total", "total_eps": budget * 1.0001, "eps": 0.2, "adapt": "steps"})
    result = train(cfg, track=False)
    assert result.status == "FINISHED"
    assert result.planned_steps == result.steps == 12  # 001 D.2: T adapted to the budget
    assert result.eps_spent == pytest.approx(budget, rel=1e-3)


def test_infeasible_budget_is_reported(tracking_uri, data_dir):
    cfg = small(privacy={"mode": "total", "total_eps": 1e-4, "eps": 0.2, "adapt": "steps"})
    result = train(cfg, tracking_uri=tracking_uri)
    assert result.status == "INFEASIBLE"
    assert "exceeds total eps" in result.message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"gar": "krum", "n_workers": 8, "f": 3}, "n >= 2f + 3"),
        ({"f": 7, "n_workers": 7}, "f must be < n_workers"),
        ({"batch_size": 200_000}, "batch_size"),
        ({"privacy": {"eps": 0.0}}, "privacy.eps"),
        ({"privacy": {"delta": 1.5}}, "delta"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"privacy": {"epsilon": 0.1}}, "valid keys here"),
        ({"gar": "nope"}, "unknown"),
        ({"attack": "nope"}, "unknown attack"),
        ({"gar": {"name": "multi_krum", "params": {"zz": 1}}}, "zz"),
        ({"attack": "none"}, "set f=0"),
        ({"clip": None}, "clip"),
        ({"lr": -1}, "lr"),
    ],
)
def test_bad_configs_are_rejected_with_the_field(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        build_config({**SMALL, **override})
    assert message in str(err.value), str(err.value)


def test_batch_larger_than_a_workers_class_shard(data_dir):
    cfg = small(batch_size=59_000, partition={"kind": "by_class", "classes_per_worker": 1})
    with pytest.raises(ValueError, match="honest worker"):
        build_context(cfg)


def test_model_init_is_seeded_locally_and_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    from tuneguard.models import build_model

    reference = [p.detach().clone() for p in build_model("mlp_001", seed=3).parameters()]

    def build(i):
        torch.manual_seed(i)  # other threads touching the global generator must not matter
        return [p.detach() for p in build_model("mlp_001", seed=3).parameters()]

    with ThreadPoolExecutor(4) as pool:
        for params in pool.map(build, range(8)):
            assert all(torch.equal(a, b) for a, b in zip(reference, params, strict=True))


@pytest.mark.parametrize("gar,attack", [
    ({"name": "bucketing+krum", "params": {"s": 2}}, {"name": "adaptive", "params": {}}),
    ("nnm+median", "little"),
])
def test_a_gar_built_once_gives_the_numbers_of_building_it_each_step(gar, attack, data_dir):
    # What an engine does with the run's Gar: build it once (build_gar(cfg)) and hand it to the
    # step functions. It must not change a number, randomised chains and GAR-aware attacks
    # included (they get the same step generator either way).
    from tuneguard.aggregators import build_gar
    from tuneguard.training.step import aggregate_and_update, byzantine_vectors, worker_round

    cfg = small(n_workers=9, f=1, gar=gar, attack=attack)
    ctx = build_context(cfg)
    run_gar = build_gar(cfg)
    theta = ctx.initial_theta()
    for t in range(2):
        honest = worker_round(ctx, theta, None, list(range(cfg.n_honest)), t)
        byz = byzantine_vectors(ctx, honest.submit, t)
        assert torch.equal(byz, byzantine_vectors(ctx, honest.submit, t, gar=run_gar))
        vectors = torch.cat([honest.submit, byz])
        new_theta, R = aggregate_and_update(ctx, theta, vectors, t)
        again, R2 = aggregate_and_update(ctx, theta, vectors, t, gar=run_gar)
        assert torch.equal(R, R2) and torch.equal(new_theta, again)
        theta = new_theta


def test_batch_indices_come_from_per_worker_keyed_streams():
    from tuneguard.data import sample_batch

    a = sample_batch(60_000, 25, 1, 3, 7)
    assert len(set(a.tolist())) == 25 and a.min() >= 0 and a.max() < 60_000  # without replacement
    assert (a == sample_batch(60_000, 25, 1, 3, 7)).all()  # a pure function of the key
    others = [sample_batch(60_000, 25, *key) for key in ((2, 3, 7), (1, 4, 7), (1, 3, 8))]
    assert all(not (a == o).all() for o in others)  # seed, worker and step each change it
    full = sample_batch(40, 40, 5, 1, 2)
    assert sorted(full.tolist()) == list(range(40))  # b = m: a permutation
    big = sample_batch(1000, 10, 2**70 + 3, 2**30, 2**40)  # fields past the packed key: hashed
    assert len(set(big.tolist())) == 10 and (big == sample_batch(1000, 10, 2**70 + 3, 2**30, 2**40)).all()


def test_keyed_streams_are_the_ones_numpy_builds():
    # The step derives its generators without building numpy objects per worker (a re-keyed
    # Philox for batch indices, SeedSequence's hash on integers for the noise seeds): the
    # numbers must be those of numpy's own constructors, on every key a run makes and past it.
    import random

    import numpy as np

    from tuneguard.data import PURPOSE_BATCH, _philox_key, sample_batch, stream_seed, stream_seeds

    def seed_sequence(*key):
        return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)

    rng = random.Random(0)
    top = 2**32 - 1
    for _ in range(500):
        seed, purpose, step = (rng.choice([0, 1, top, rng.randrange(2**32), 2**32, rng.randrange(2**70)]) for _ in range(3))
        workers = [rng.choice([0, 1, 11, top, rng.randrange(2**32), 2**33]) for _ in range(rng.randrange(4))]
        assert stream_seeds(seed, purpose, workers, step) == [seed_sequence(seed, purpose, w, step) for w in workers]
        assert stream_seed(seed, purpose, 3, step) == seed_sequence(seed, purpose, 3, step)
    for _ in range(200):
        seed = rng.choice([1, rng.randrange(2**63), rng.randrange(2**70)])
        worker, step = rng.choice([3, rng.randrange(2**25)]), rng.choice([7, rng.randrange(2**33)])
        m = rng.choice([40, 1000, 60_000])
        b = rng.randrange(1, 41)
        fresh = np.random.Generator(np.random.Philox(key=_philox_key(seed, PURPOSE_BATCH, worker, step)))
        assert (sample_batch(m, b, seed, worker, step) == fresh.choice(m, size=b, replace=False)).all()
