"""tuneguard: hyperparameter search for training with differential privacy and Byzantine
robustness at once.

Library entry points (each a small module, importable without Ray or MLflow):

- :mod:`tuneguard.aggregators`  robust gradient aggregation rules (GARs) and their registry
- :mod:`tuneguard.attacks`      Byzantine attacks and their registry
- :mod:`tuneguard.privacy`      per-example clipping, noise calibration, privacy accounting
- :mod:`tuneguard.config`       the typed experiment config
- :mod:`tuneguard.training`     the step (Algorithm 1 of paper 001), local and Ray actor engines
- :mod:`tuneguard.tune`         Ray Tune + Optuna search over experiment configs
- :mod:`tuneguard.results`      the MLflow schema, export, report, UI

The Python API (:mod:`tuneguard.api`), imported on first use so ``import tuneguard`` stays light:
``tuneguard.tune(space_or_path, **overrides) -> TuneResults`` and
``tuneguard.train(config, **overrides) -> RunResult``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: the API pulls in Ray, MLflow and torch only when called.
    if name == "tune":
        import tuneguard.tune as tune_pkg  # a callable package: tuneguard.tune(space, ...)

        return tune_pkg
    if name == "train":
        from tuneguard.api import train

        return train
    if name == "results":
        import tuneguard.results as results_pkg

        return results_pkg
    raise AttributeError(f"module 'tuneguard' has no attribute {name!r}")
