"""Training: the step of Algorithm 1 (paper 001), the local and Ray actor engines, metrics.

- :mod:`.step`     the pure step functions both engines call
- :mod:`.local`    all workers batched in this process
- :mod:`.actors`   honest-worker and Byzantine actors (Ray), the driver as parameter server
- :mod:`.run`      one run end to end, tracked in MLflow: :func:`train`
"""

from tuneguard.training.run import RunResult, train

__all__ = ["RunResult", "train"]
