"""The Ray actors of the actor engine: honest workers and Byzantine workers (the parameter
server is the process that drives the run, see :mod:`.engine`). They are warm (started once, reset for each run) and
stateless between steps: everything a step needs (theta_t, the previous momentum) arrives as an
argument, by ObjectRef, or sits in the run's shared buffers, so a restarted actor recomputes a
step exactly, and a step can be retried without double-applying momentum.

A step reaches an actor one of two ways, computed the same: a Ray call (:meth:`round`,
:meth:`craft`; values as dicts of numpy arrays, which Ray stores once in the object store and
same-node readers map without copying), or, from a server on the same node, the actor's channel
(:mod:`.channel`: served by threads of this process, rows read and written in shared memory).
Either takes the actor's lock, so it computes one thing at a time.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np
import ray
import torch

from tuneguard.config import ExperimentConfig
from tuneguard.data import Dataset
from tuneguard.training.actors import channel as channels
from tuneguard.training.context import build_context
from tuneguard.training.metrics import Moments
from tuneguard.training.plan import PrivacyPlan
from tuneguard.training.step import byzantine_vectors, worker_round

Packed = dict[str, Any]  # str -> numpy array (what actors return)

_NOT_WRITABLE = "The given NumPy array is not writable"


def dataset_to_numpy(data: Dataset) -> Packed:
    """What the driver ``ray.put``s once: the preprocessed dataset as numpy arrays."""
    return {"name": data.name, **{k: getattr(data, k).cpu().numpy() for k in ("train_x", "train_y", "test_x", "test_y")}}


def dataset_from_numpy(packed: Packed) -> Dataset:
    """Tensors over the object store's read-only buffers (no copy)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE)
        return Dataset(packed["name"], *(torch.from_numpy(packed[k]) for k in ("train_x", "train_y", "test_x", "test_y")))


def to_tensor(a: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    if a is None:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE)
        return torch.from_numpy(a).to(device)


def pack(**tensors: torch.Tensor | None) -> Packed:
    """Tensors -> numpy arrays; a tensor given under two names is stored once."""
    seen: dict[int, np.ndarray] = {}
    out: Packed = {}
    for k, t in tensors.items():
        if t is None:
            continue
        if id(t) not in seen:
            seen[id(t)] = t.detach().cpu().numpy()
        out[k] = seen[id(t)]
    return out


def memory_info() -> dict[str, float]:
    """This process's memory in MiB: rss, pss (shared pages divided among their users) and uss
    (private), from /proc/self/smaps_rollup (Linux); rss only elsewhere."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/smaps_rollup") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        kib = lambda name: float(fields[name].split()[0])  # noqa: E731
        out = {"rss": kib("Rss") / 1024, "pss": kib("Pss") / 1024,
               "uss": (kib("Private_Clean") + kib("Private_Dirty")) / 1024}
    except (OSError, KeyError, ValueError):
        import resource

        out = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return out


class _Role:
    """Shared set-up: threads, the device; the run's RunContext, rebuilt by :meth:`reset`.

    An actor outlives runs: the pool (:mod:`.pool`) starts it once and calls ``reset`` at the
    start of every run. It may serve several runs at once (the runs of a Tune trial go side by
    side through the trial's actors, their calls interleaving), each under its own key, with its
    own run context; ``drop`` forgets a finished run. The dataset is fetched from the object
    store once per actor (by data key) and kept while a run uses it; ``reset`` only rebuilds the
    cheap parts (partition, model, buffers).
    """

    def __init__(self, device: str, threads: int):
        torch.set_num_threads(max(1, threads))
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE)
        self.device = torch.device(device)
        self.runs: dict[str, Any] = {}  # run key -> RunContext
        self._data_of: dict[str, str] = {}  # run key -> data key
        self._data: dict[str, Dataset] = {}  # data key -> dataset
        self.resets = 0
        # One computation at a time, whether a step arrives as a Ray call or on a same-node
        # channel (:mod:`.channel`, served by threads of this process).
        self.lock = threading.RLock()
        self.channel = None
        if channels.supported() and self.device.type == "cpu":
            self.channel = channels.ChannelListener(self._on_channel, self.lock)

    def reset(self, cfg: ExperimentConfig, plan: PrivacyPlan, data_key: str, data_box: list,
              run: str = "") -> tuple[int, str, str]:
        """Prepare for run ``run`` of ``cfg``. ``data_box``: [ObjectRef of the packed dataset],
        boxed so that Ray does not fetch it unless this actor lacks ``data_key``."""
        self.drop(run)
        with self.lock:
            if data_key not in self._data:
                self._data[data_key] = dataset_from_numpy(ray.get(data_box[0])).to(self.device)
            self._data_of[run] = data_key
            self.runs[run] = build_context(cfg, self.device, data=self._data[data_key], plan=plan)
            self.resets += 1
        return self.ready()

    def drop(self, run: str) -> None:
        """Forget run ``run`` (and a dataset no run uses any more)."""
        with self.lock:
            self.runs.pop(run, None)
            self._data_of.pop(run, None)
            for key in [k for k in self._data if k not in self._data_of.values()]:
                del self._data[key]

    def ready(self) -> tuple[int, str, str, tuple[str, bytes] | None]:
        """(process id, actor id, node id, channel address): the engine matches lost-actor errors
        to actors by the actor id; the node id says where the actor runs; a server on the same
        node connects to the address (:mod:`.channel`; None where this actor has none)."""
        ctx = ray.get_runtime_context()
        return os.getpid(), ctx.get_actor_id(), ctx.get_node_id(), self.channel.address if self.channel else None

    def _on_channel(self, buffers: channels.SharedBuffers, spec: dict[str, Any], step: tuple[int, int, bool]) -> Any:
        raise NotImplementedError

    def memory(self) -> dict[str, float]:
        return {"pid": os.getpid(), "resets": self.resets, **memory_info()}


@ray.remote
class HonestWorkers(_Role):
    """Step 2 of Algorithm 1 for a contiguous range of honest worker ids, batched in one pass."""

    def __init__(self, device, threads, workers: list[int]):
        super().__init__(device, threads)
        self.workers = list(workers)

    def round(self, run: str, theta: np.ndarray, prev: Packed | None, t: int) -> Packed:
        """Step t of run ``run``. ``prev``: this actor's output of step t - 1 (its momentum),
        None at the first step.

        The [k, d] submitted rows come back as one contiguous array (doubling as the momentum
        buffer when momentum is on), with the moments of the rows before noise; Ray stores them
        once and same-node readers map them without a copy."""
        with self.lock:
            mom = to_tensor(prev.get("momentum"), self.device) if prev else None
            out = worker_round(self.runs[run], to_tensor(theta, self.device), mom, self.workers, t)
            # The "sample" rows (before noise) only feed the VN metrics: their moments go instead
            # of [k, d] more floats through the object store (~1.6 ms per MB on the reference VM).
            moments = Moments.of(out.sample)
            return {**pack(sample_mean=moments.mean, submit=out.submit, momentum=out.momentum, loss=out.loss,
                           grad_norm=out.grad_norm, clipped_frac=out.clipped_frac), "sample_m2": moments.m2}

    def _on_channel(self, buffers: channels.SharedBuffers, spec: dict[str, Any], step: tuple[int, int, bool]) -> Any:
        """Step t of run ``spec["run"]`` on a channel (``step``: (t, w, prev)): :meth:`round`
        with the rows written into ``buffers.rows[w]`` (momentum read from ``rows[1 - w]`` when
        ``prev``) and the rows' means into this actor's ``means`` rows; returns the
        per-worker scalars.

        It also computes the moments of its submitted rows (the server's "submit" VN ratio) with
        the one-pass statistics the local engine uses, while the server would otherwise wait:
        the server combines the groups' moments, as for the "sample" rows."""
        t, w, prev = step
        lo, hi = self.workers[0], self.workers[-1] + 1
        rows = buffers.rows[w][lo:hi]
        mom = buffers.rows[1 - w][lo:hi] if prev else None
        out = worker_round(self.runs[spec["run"]], buffers.theta, mom, self.workers, t, submit_out=rows)
        if out.submit.data_ptr() != rows.data_ptr():
            rows.copy_(out.submit)
        sample, submit = Moments.of(out.sample), Moments.of_deviations(rows)
        means = buffers.means[spec["index"]]
        means[0].copy_(sample.mean)
        means[1].copy_(submit.mean)
        return out.loss.numpy(), out.grad_norm.numpy(), out.clipped_frac.numpy(), sample.m2, submit.m2


@ray.remote
class ByzantineWorkers(_Role):
    """Step 3: the f colluding, omniscient Byzantine workers (ids h..n-1). They see every honest
    submission; label flippers instead train on flipped labels (with their own momentum)."""

    def craft(self, run: str, t: int, theta: np.ndarray | None, prev: Packed | None, *honest: Packed) -> Packed:
        with self.lock:
            ctx = self.runs[run]
            ids = list(range(ctx.cfg.n_honest, ctx.cfg.n_workers))
            flipped = None
            if ctx.label_flip:
                mom = to_tensor(prev.get("momentum"), self.device) if prev else None
                flipped = worker_round(ctx, to_tensor(theta, self.device), mom, ids, t, flip=True)
            submit = (read_rows([h["submit"] for h in honest], self.device) if honest
                      else torch.empty(0, ctx.d, device=self.device))
            vectors = byzantine_vectors(ctx, submit, t, flipped, gar=ctx.gar)
            return pack(vectors=vectors, momentum=flipped.momentum if flipped is not None else None)

    def _on_channel(self, buffers: channels.SharedBuffers, spec: dict[str, Any], step: tuple[int, int, bool]) -> Any:
        """Step t of run ``spec["run"]`` on a channel (``step``: (t, w, prev)): the f rows below
        the honest ones in ``buffers.rows[w]``, crafted from the honest rows there (label
        flippers: trained, their momentum read from ``rows[1 - w]`` when ``prev``)."""
        t, w, prev = step
        ctx = self.runs[spec["run"]]
        h, n = ctx.cfg.n_honest, ctx.cfg.n_workers
        dest = buffers.rows[w][h:n]
        if ctx.label_flip:
            mom = buffers.rows[1 - w][h:n] if prev else None
            vectors = worker_round(ctx, buffers.theta, mom, list(range(h, n)), t, flip=True, submit_out=dest).submit
        else:
            vectors = byzantine_vectors(ctx, buffers.rows[w][:h], t, None, gar=ctx.gar)
        if vectors.data_ptr() != dest.data_ptr():
            dest.copy_(vectors)
        return None


def read_rows(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """The rows of ``arrays`` as one tensor, for reading only: a single CPU array is viewed in
    place (the object store's buffer, no copy: one worker actor per trial is the common case),
    several are concatenated."""
    if len(arrays) == 1 and device.type == "cpu":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_WRITABLE)
            return torch.from_numpy(arrays[0])
    return _cat(arrays, device)


def _cat(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """One writable tensor (a copy: the object store's buffers are shared, never written)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE)
        return torch.cat([torch.from_numpy(a) for a in arrays]).to(device)
