"""Search-space files: parsing, validation before anything runs, the shipped spaces, and the
define-by-run function Optuna samples from (no Ray here)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from tuneguard.config import ConfigError
from tuneguard.tune.space import Excluded, Space, SpaceError, expand

REPO = Path(__file__).resolve().parents[1]


def space(text: str) -> Space:
    return Space.from_text(textwrap.dedent(text))


BASE = """
base: {dataset: mnist, n_workers: 7, f: 1, steps: 4, eval_every: 2}
"""


# --------------------------------------------------------------------------------------------
# Shipped spaces
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["quickstart", "paper_fashion_mnist", "paper_mnist", "heterogeneous_sign"])
def test_shipped_spaces_validate(name):
    sp = Space.load(REPO / "search_spaces" / f"{name}.yaml")
    report = sp.validate()
    assert report.checked > 0
    assert sp.total_trials() >= 1


@pytest.mark.parametrize("name", ["paper_fashion_mnist", "paper_mnist"])
def test_paper_grid_is_the_001_grid(name):
    sp = Space.load(REPO / "search_spaces" / f"{name}.yaml")
    report = sp.validate()
    pts = report.points
    # 9 b x 3 eps x (f=3: 2 attacks x 4 GARs + f=6: 2 attacks x 3 GARs) x 5 seeds + baseline
    assert len(pts) == 9 * 3 * (8 + 6) * 5 + 9 * 3 * 5 == 2025
    assert {p["batch_size"] for p in pts} == {25, 50, 150, 300, 500, 750, 1000, 1250, 1500}
    assert {p["privacy.eps"] for p in pts} == {0.2, 0.1, 0.05}
    assert {p["seed"] for p in pts} == {1, 2, 3, 4, 5}
    assert not [p for p in pts if p["gar"] == "bulyan" and p["f"] == 6]
    assert len([p for p in pts if p["gar"] == "bulyan" and p["f"] == 3]) == 9 * 3 * 2 * 5
    baseline = [p for p in pts if p["f"] == 0]
    assert len(baseline) == 135 and {p["gar"] for p in baseline} == {"average"}
    # Bulyan at f = 6 is reported as excluded, with the rule's requirement
    assert len(report.excluded) == 270
    assert all("bulyan needs n >= 4f + 3" in e.reason for e in report.excluded)
    text = "\n".join(report.lines("grid"))
    assert "270 with f=6, gar=bulyan" in text and "removed from the grid" in text
    cfg = sp.runs(pts[0])[0].cfg
    assert (cfg.n_workers, cfg.momentum, cfg.lr, cfg.clip, cfg.steps) == (15, 0.99, 0.5, 2.0, 300)
    assert cfg.privacy.delta == 1e-5 and cfg.privacy.mode == "per_step"
    # What a trial receives is the Tune config (encoded); both grids use the names f, gar and
    # attack with different values, and each point must come back as itself.
    for p in pts:
        assert sp.decode(sp.encode(p)) == p
    attacked = next(p for p in pts if p["f"] == 6 and p["gar"] == "krum")
    cfg = sp.runs(sp.decode(sp.encode(attacked)))[0].cfg
    assert (cfg.f, cfg.gar.name, cfg.attack.name) == (6, "krum", attacked["attack"])


def test_heterogeneous_space_matches_003():
    sp = Space.load(REPO / "search_spaces" / "heterogeneous_sign.yaml")
    sp.validate()
    [run] = sp.runs({"gar": "sign_majority", "perturbation": 0.01, "partition.classes_per_worker": 1, "lr_sign": 0.001})
    cfg = run.cfg
    assert cfg.gar.name == "sign_majority" and cfg.perturbation == 0.01 and cfg.lr == 0.001
    assert cfg.privacy.mode == "none" and cfg.clip is None and cfg.momentum == 0.0
    assert cfg.partition.kind == "by_class"
    [run] = sp.runs({"gar": "median", "perturbation": 0.5, "partition.classes_per_worker": 2, "lr_median": 0.2})
    assert run.cfg.gar.name == "median" and run.cfg.lr == 0.2 and run.cfg.partition.classes_per_worker == 2


# --------------------------------------------------------------------------------------------
# Validation errors: clear messages, before anything runs
# --------------------------------------------------------------------------------------------
def test_unknown_parameter_path_names_the_key_and_valid_ones():
    with pytest.raises(SpaceError) as err:
        space(BASE + "search: {privacy.epsilon: [0.1, 0.2]}")
    msg = str(err.value)
    assert "search.privacy.epsilon" in msg and "unknown config key 'epsilon'" in msg
    assert "total_eps" in msg and "eps" in msg  # lists what exists under privacy
    with pytest.raises(SpaceError, match="unknown config key 'batchsize'"):
        space(BASE + "search: {batchsize: [8, 16]}")
    with pytest.raises(SpaceError, match="'lr' is a value, it has no key 'x'"):
        space(BASE + "search: {lr.x: 1}")


def test_unknown_base_key_is_an_error():
    sp = space("base: {dataset: mnist, n_workerz: 3}\nsearch: {lr: [0.1, 0.2]}")
    with pytest.raises(SpaceError, match="n_workerz: unknown key"):
        sp.validate()


def test_bad_parameter_specs():
    with pytest.raises(SpaceError, match="low < high"):
        space(BASE + "search: {lr: {uniform: [0.5, 0.1]}}")
    with pytest.raises(SpaceError, match="low > 0"):
        space(BASE + "search: {lr: {loguniform: [0, 0.1]}}")
    with pytest.raises(SpaceError, match="expected one of const, choice"):
        space(BASE + "search: {lr: {gaussian: [0, 1]}}")
    with pytest.raises(SpaceError, match="grid mode takes lists"):
        space(BASE + "search: {lr: {uniform: [0.1, 0.5]}}\ntune: {mode: grid}")
    with pytest.raises(SpaceError, match="not a parameter of this search"):
        space(BASE + "search: {gar.params.m: {int: [1, 3], when: {garr: multi_krum}}}")
    with pytest.raises(SpaceError, match="never takes"):
        space(BASE + "search: {gar: [krum, median], gar.params.m: {int: [1, 3], when: {gar: multi_krum}}}")
    with pytest.raises(SpaceError, match=r"tune\.objectiv: unknown key"):
        space(BASE + "tune: {objectiv: worst_case}")
    with pytest.raises(SpaceError, match="unknown section"):
        space(BASE + "serch: {lr: [0.1]}")


def test_invalid_values_are_reported_with_the_combination():
    sp = space(BASE + "search: {lr: [0.1, -1.0]}")
    with pytest.raises(SpaceError) as err:
        sp.validate()
    assert "lr=-1.0" in str(err.value) and "greater than 0" in str(err.value)
    # an unknown GAR is an error, not an exclusion
    sp = space(BASE + "search: {gar: [krum, krumm]}")
    with pytest.raises(SpaceError, match="unknown aggregation rule 'krumm'"):
        sp.validate()


def test_objective_and_scenario_consistency():
    with pytest.raises(SpaceError, match="worst_case needs the attack set"):
        space(BASE + "tune: {objective: worst_case}")
    with pytest.raises(SpaceError, match="use objective: worst_case"):
        space(BASE + "scenario: {attacks: [little, empire]}")
    with pytest.raises(SpaceError, match="do not search over attack"):
        space(BASE + "scenario: {attacks: [little, empire]}\nsearch: {attack: [little]}\ntune: {objective: worst_case}")
    with pytest.raises(SpaceError, match="tune.seeds and a search parameter 'seed'"):
        space(BASE + "search: {seed: [1, 2]}\ntune: {seeds: [1, 2]}")


def test_bulyan_with_f6_is_excluded_and_reported():
    sp = space("""
        base: {dataset: mnist, n_workers: 15, steps: 4}
        search: {f: [3, 6], gar: [bulyan, median]}
        tune: {mode: grid}
    """)
    report = sp.validate()
    assert len(report.points) == 3
    assert [e.point for e in report.excluded] == [{"f": 6, "gar": "bulyan"}]
    assert "n >= 4f + 3" in report.excluded[0].reason
    # optuna mode: the same combination is excluded at trial time, not an error
    sp = space("""
        base: {dataset: mnist, n_workers: 15, steps: 4}
        search: {f: [3, 6], gar: [bulyan, median]}
    """)
    report = sp.validate()
    assert len(report.excluded) == 1
    assert "reports objective 0.0 (excluded: 1)" in "\n".join(report.lines("optuna"))
    with pytest.raises(Excluded, match="bulyan needs"):
        sp.runs({"f": 6, "gar": "bulyan"})


def test_impossible_space_is_an_error():
    sp = space("""
        base: {dataset: mnist, n_workers: 5, f: 2}
        search: {gar: [krum, bulyan]}
    """)
    with pytest.raises(SpaceError) as err:
        sp.validate()
    assert "no combination of this search space can run" in str(err.value)
    assert "krum needs n >= 2f + 3" in str(err.value)


def test_range_endpoints_are_checked():
    # multi_krum's m must be <= n - f: the high endpoint 9 > 7 - 1 fails (excluded, reported)
    sp = space(BASE + "search: {gar: [multi_krum, median], gar.params.m: {int: [2, 9], when: {gar: multi_krum}}}")
    report = sp.validate()
    assert report.checked == 3
    assert [e.point for e in report.excluded] == [{"gar": "multi_krum", "gar.params.m": 9}]


# --------------------------------------------------------------------------------------------
# Applying points, conditions, scenario
# --------------------------------------------------------------------------------------------
def test_conditional_parameters_and_rule_switching():
    sp = space("""
        base: {dataset: mnist, n_workers: 9, f: 1, gar: {name: multi_krum, params: {m: 2}}}
        search:
          gar: [multi_krum, krum]
          gar.params.m: {int: [2, 4], when: {gar: multi_krum}}
    """)
    pts = expand(sp.params)
    assert {"gar": "krum"} in pts and {"gar": "multi_krum", "gar.params.m": 4} in pts
    assert len(pts) == 3
    [run] = sp.runs({"gar": "krum"})
    assert run.cfg.gar.name == "krum" and run.cfg.gar.params == {}  # base params were multi_krum's
    [run] = sp.runs({"gar": "multi_krum", "gar.params.m": 3})
    assert run.cfg.gar.params == {"m": 3}


def test_worst_case_runs_one_config_per_attack_and_seed():
    sp = space(BASE + """
scenario: {f: 2, attacks: [little, {name: empire, params: {zeta: 2.0}}], privacy: {mode: total, total_eps: 3.0}}
search: {batch_size: [8, 16]}
tune: {objective: worst_case, seeds: [1, 2]}
""")
    runs = sp.runs({"batch_size": 8})
    assert [(r.attack, r.seed) for r in runs] == [("little", 1), ("empire", 1), ("little", 2), ("empire", 2)]
    assert len({r.key for r in runs}) == 4
    assert runs[1].cfg.attack.params == {"zeta": 2.0}
    assert all(r.cfg.f == 2 and r.cfg.privacy.mode == "total" and r.cfg.privacy.total_eps == 3.0 for r in runs)


def test_grids_giving_one_name_different_values_decode_per_grid():
    sp = space(BASE + textwrap.dedent("""
        search:
          - {f: [1, 2], gar: {choice: [median, {name: krum}]}, lr: 0.1}
          - {f: 0, gar: average, lr: {choice: [0.2, 0.3]}}
        tune: {mode: grid}
    """))
    pts = sp.validate().points
    assert len(pts) == 6
    for p in pts:
        assert sp.decode(sp.encode(p)) == p
    assert sp.decode({"f": 0, "gar": "average", "lr": 0.3}) == {"f": 0, "gar": "average", "lr": 0.3}
    with pytest.raises(SpaceError):
        sp.decode({"f": 0, "gar": "median", "lr": 0.1})  # no grid has this combination


def test_mapping_choices_round_trip_through_labels():
    sp = space(BASE + "search: {gar: [median, {name: multi_krum, params: {m: 3}}]}")
    labels = sp.params[0].labels
    assert all(isinstance(x, str) for x in labels)
    point = sp.decode({"gar": labels[1]})
    assert point == {"gar": {"name": "multi_krum", "params": {"m": 3}}}
    assert sp.runs(point)[0].cfg.gar.params == {"m": 3}
    assert sp.encode(point) == {"gar": labels[1]}


def test_set_overrides_edit_the_space():
    text = (REPO / "search_spaces" / "quickstart.yaml").read_text()
    sp = Space.from_text(text, None, ["tune.num_samples=2", "base.steps=6", "search.lr=0.1"])
    assert sp.num_samples == 2 and sp.base["steps"] == 6
    assert [p for p in sp.params if p.name == "lr"][0].kind == "const"
    again = Space.from_text(sp.text)  # what trials and --resume read back holds the overrides
    assert again.num_samples == 2 and again.base["steps"] == 6 and again.raw == sp.raw
    with pytest.raises(SpaceError, match="start with a section"):
        Space.from_text(text, None, ["steps=6"])


def test_define_by_run_samples_conditional_space_in_optuna():
    from tuneguard.tune.search import DefineByRun

    text = BASE + textwrap.dedent("""
        search:
          gar: [multi_krum, median]
          gar.params.m: {int: [2, 4], when: {gar: multi_krum}}
          batch_size: {logint: [8, 64]}
          lr: {loguniform: [0.01, 0.5]}
          momentum: 0.5
    """)
    fn = DefineByRun(text, None)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        consts = fn(trial)
        params = dict(trial.params)
        assert consts == {"momentum": 0.5}
        assert ("gar.params.m" in params) == (params["gar"] == "multi_krum")
        assert 8 <= params["batch_size"] <= 64 and 0.01 <= params["lr"] <= 0.5
        seen.add(params["gar"])
        study.tell(trial, 0.5)
    assert seen == {"multi_krum", "median"}
    import pickle

    assert pickle.loads(pickle.dumps(fn)).space_text == text  # OptunaSearch pickles its space


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def test_cli_reports_space_errors_without_traceback(tmp_path):
    from tuneguard.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": {"dataset": "mnist"}, "search": {"privacy.epsilon": [0.1]}}))
    res = CliRunner().invoke(app, ["tune", str(bad)])
    assert res.exit_code == 2
    assert "unknown config key 'epsilon'" in res.output and "Traceback" not in res.output


def test_cli_dry_run_prints_the_plan():
    from tuneguard.cli import app

    res = CliRunner().invoke(app, ["tune", str(REPO / "search_spaces" / "paper_mnist.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "2025 point(s) will run" in res.output and "270 with f=6, gar=bulyan" in res.output


def test_config_error_is_a_value_error():
    assert issubclass(SpaceError, ConfigError)


def test_flat_params_are_valid_mlflow_param_names():
    import re

    for name in ("paper_mnist", "heterogeneous_sign", "quickstart"):
        params = Space.load(REPO / "search_spaces" / f"{name}.yaml").flat_params()
        assert params and all(re.fullmatch(r"[/\w.\- :]+", k) and len(k) <= 250 for k in params), params
    params = Space.load(REPO / "search_spaces" / "paper_mnist.yaml").flat_params()
    assert params["search.1.gar"] == "average" and params["tune.mode"] == "grid"


def test_tune_jobs_run_on_ray_actors_unless_the_space_says_otherwise():
    """Issue 12: actors are the default engine of tune jobs; base.engine, then tune.engine, override."""
    search = "search: {batch_size: [8]}\n"
    assert space(BASE + search).base_raw()["engine"] == "actors"
    assert space(BASE.replace("eval_every: 2", "eval_every: 2, engine: local") + search).base_raw()["engine"] == "local"
    assert space(BASE + search + "tune: {engine: local}\n").base_raw()["engine"] == "local"
    assert Space.load(REPO / "search_spaces" / "quickstart.yaml").base_raw()["engine"] == "actors"
