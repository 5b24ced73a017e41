"""What a process needs to compute steps of one run: the config, the model, the data, the plan.

Built once per process (the local engine builds one; each Ray actor builds its own), never per
step. Everything here is fixed for the run; the changing state (parameters, momentum) is passed
to the step functions explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tuneguard.aggregators import Gar, build_gar
from tuneguard.config import ExperimentConfig
from tuneguard.data import Dataset, load_dataset, partition
from tuneguard.models import build_checked, build_model, flatten_parameters
from tuneguard.training.plan import PrivacyPlan, plan_privacy


@dataclass
class RunContext:
    cfg: ExperimentConfig
    device: torch.device
    model: nn.Module
    params: torch.Tensor  # the model's flat parameter storage (the model's parameters view it)
    data: Dataset  # on ``device``
    shards: list[torch.Tensor] | None  # per honest worker example indices, None for iid
    plan: PrivacyPlan
    label_flip: bool  # Byzantine workers train on flipped labels instead of crafting vectors
    # Reused [k, d] outputs of the clipping pass, one per worker group: a fresh allocation each
    # step costs up to 3x at small b (benchmarks/clipping.py).
    grad_buffers: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    # Reused [k * b, features] batch of each worker group: above 32 MiB (b = 1500) malloc maps
    # fresh pages for every allocation, and faulting them in costs as much as the gather itself.
    batch_buffers: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    # The run's GAR, its chain resolved and checked once (aggregators.build_gar): every step,
    # the GAR-aware attacks and the metrics use this object instead of parsing the name again.
    gar: Gar | None = None

    def grad_buffer(self, workers: tuple[int, ...]) -> torch.Tensor:
        buf = self.grad_buffers.get(workers)
        if buf is None:
            buf = self.grad_buffers[workers] = torch.empty(len(workers), self.d, device=self.device, dtype=self.params.dtype)
        return buf

    def batch_buffer(self, workers: tuple[int, ...], rows: int) -> torch.Tensor:
        buf = self.batch_buffers.get(workers)
        x = self.data.train_x
        if buf is None or buf.shape[0] != rows:
            buf = self.batch_buffers[workers] = torch.empty(rows, x[0].numel(), device=x.device, dtype=x.dtype)
        return buf

    @property
    def d(self) -> int:
        return self.params.numel()

    def worker_size(self, worker: int) -> int:
        """Number of examples worker ``worker`` samples from (Byzantine label-flippers: all)."""
        if self.shards is None or worker >= len(self.shards):
            return self.data.train_y.numel()
        return self.shards[worker].numel()

    def set_params(self, theta: torch.Tensor) -> None:
        if theta.data_ptr() != self.params.data_ptr():
            self.params.copy_(theta)

    def initial_theta(self) -> torch.Tensor:
        return build_theta(self.cfg, self.device, self.data)


def build_theta(cfg: ExperimentConfig, device: torch.device | str, data: Dataset | None = None) -> torch.Tensor:
    """theta_0, seeded by the run seed only (the same on every process). The model's input
    shape and classes come from ``data`` (loaded, from the per-process cache, when not given)."""
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir, cfg.dataset_params)
    model = build_model(cfg.model, seed=cfg.seed, input_shape=data.input_shape, num_classes=data.num_classes,
                        params=cfg.model_params)
    return flatten_parameters(model).to(device)


def build_context(
    cfg: ExperimentConfig,
    device: str | torch.device | None = None,
    *,
    data: Dataset | None = None,
    plan: PrivacyPlan | None = None,
) -> RunContext:
    """Load data, partition it, build the model and resolve the privacy plan.

    ``data`` / ``plan``, when given, replace loading the dataset / resolving the plan (the actor
    engine loads the data once and shares it through the object store).
    """
    from tuneguard.attacks import ATTACKS
    from tuneguard.training.allocator import keep_freed_memory

    keep_freed_memory()
    dev = torch.device(device or cfg.resolved_device())
    data = (data if data is not None else load_dataset(cfg.dataset, cfg.data_dir, cfg.dataset_params)).to(dev)
    if cfg.partition.kind == "by_class" and cfg.partition.classes_per_worker > data.num_classes:
        raise ValueError(f"partition.classes_per_worker={cfg.partition.classes_per_worker} exceeds the "
                         f"{data.num_classes} classes of dataset {cfg.dataset!r}")
    shards = partition(
        data.train_y, cfg.n_honest, cfg.partition.kind,
        classes_per_worker=cfg.partition.classes_per_worker, alpha=cfg.partition.alpha, seed=cfg.seed,
    )
    if shards is not None:
        shards = [s.to(dev) for s in shards]
        m = min(s.numel() for s in shards)
        if m < cfg.batch_size:
            smallest = min(range(len(shards)), key=lambda i: shards[i].numel())
            raise ValueError(
                f"batch_size={cfg.batch_size} exceeds the {m} examples honest worker {smallest} holds under "
                f"partition {cfg.partition.kind!r}; use a smaller batch_size or another partition"
            )
    else:
        m = data.train_y.numel()
        if m < cfg.batch_size:
            raise ValueError(f"batch_size={cfg.batch_size} exceeds the {m} training examples of dataset {cfg.dataset!r}")
    # built for the data's input shape and classes, validated (BatchNorm refused, fast-path
    # fallback announced) before step 0; a model given by import path is imported here, in
    # every process that trains (Ray actors too)
    model = build_checked(cfg.model, cfg.seed, data.input_shape, data.num_classes, cfg.model_params).to(dev)
    params = flatten_parameters(model)
    label_flip = cfg.f > 0 and cfg.attack.name in ATTACKS and ATTACKS[cfg.attack.name].data_attack
    plan = plan if plan is not None else plan_privacy(cfg, m)
    ctx = RunContext(cfg, dev, model, params, data, shards, plan, label_flip)
    ctx.gar = build_gar(cfg)
    return ctx
