"""Per-step metrics: the VN ratio (001 Eq. 37), accuracy, and the cheap statistics of a step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tuneguard.training.context import RunContext

if TYPE_CHECKING:
    from tuneguard.aggregators import Gar


def vn_ratio(vectors: torch.Tensor) -> float:
    """Empirical variance-to-norm ratio of i.i.d. estimates G_1..G_k of E G (001 Eq. 37):

        VN = sqrt(E ||G - E G||^2) / ||E G||,

    estimated with the unbiased variance sum_i ||G_i - mean||^2 / (k - 1) over the honest
    workers' vectors. NaN when fewer than two vectors; inf when the mean is zero.
    """
    return _vn_ratio(vectors)


def _vn_ratio(vectors: torch.Tensor, mean: torch.Tensor | None = None) -> float:
    """:func:`vn_ratio`, reusing the rows' ``mean`` where the caller has it (one pass fewer)."""
    if vectors.shape[0] < 2:
        return math.nan
    mean = vectors.mean(0) if mean is None else mean
    return _ratio(_spread(vectors, mean), float(mean.norm()))


def _spread(vectors: torch.Tensor, mean: torch.Tensor) -> float:
    """sqrt(sum_i ||G_i - mean||^2 / (k - 1)): the estimated sqrt(E||G - E G||^2); NaN for k < 2."""
    k = vectors.shape[0]
    if k < 2:
        return math.nan
    # One norm over the whole difference: no squared temporary, one pass fewer.
    return float(torch.linalg.vector_norm(vectors - mean)) / math.sqrt(k - 1)


# Below this share of sum_i ||G_i||^2, m2 = sum_i ||G_i||^2 - k ||mean||^2 has cancelled more
# than 7 bits and is recomputed from the centred rows.
_CANCELLED = 2.0**-7


def _sum_sq_dev(vectors: torch.Tensor, mean: torch.Tensor) -> float:
    """m2 = sum_i ||G_i - mean||^2 of the rows, ``mean`` their mean.

    As ``sum_i ||G_i||^2 - k ||mean||^2``: one read of the rows for their norms (no squared
    temporary; ~6e-7 relative error per row of ~80k float32 values, added in float64) and a
    sum over d, instead of a centred [k, d] copy. The subtraction loses
    log2(sum_i ||G_i||^2 / m2) bits: at a VN ratio v that ratio is about 1 + 1/v^2 (13 at
    v = 0.3, ~60 at v = 0.13). When it passes 2^7 (rows nearly equal, e.g. without noise at
    large b), m2 is computed from the centred rows instead. On the 001 MLP's clipped batch
    gradients (v ~ 0.2) the relative error measured 5e-6 (b = 25) to 7e-5 (b = 1500),
    against ~2e-4 for the former ``vector_norm(vectors - mean)`` (float32 accumulation over
    k d values). The server's "submit" moments come from :meth:`Moments.of_deviations`."""
    k = vectors.shape[0]
    if k < 2:
        return 0.0
    total = float(torch.linalg.vector_norm(vectors, dim=1).double().square().sum())
    m2 = total - k * float(mean.square().sum())
    if not math.isfinite(m2) or m2 >= total * _CANCELLED:
        return m2
    return float((vectors - mean).square_().sum())


def _ratio(spread: float, norm: float) -> float:
    if math.isnan(spread):
        return math.nan
    return spread / norm if norm > 0 else math.inf


@dataclass(frozen=True)
class Moments:
    """What the VN ratio needs of k vectors, without the vectors: their count, mean and
    ``m2 = sum_i ||G_i - mean||^2``. Worker actors send these for their "sample" rows (the batch
    gradients before noise), which only the metrics read, instead of the [k, d] rows; the server
    combines the groups exactly (Chan et al. 1979):

        mean = sum_a k_a mean_a / k,   m2 = sum_a (m2_a + k_a ||mean_a - mean||^2).
    """

    k: int
    mean: torch.Tensor  # [d]
    m2: float

    @staticmethod
    def of(vectors: torch.Tensor) -> Moments:
        """The moments of the rows of ``vectors`` [k, d]: two reads of the rows, no [k, d]
        temporary kept (see :func:`_sum_sq_dev`)."""
        k = vectors.shape[0]
        mean = vectors.sum(0).div_(k)
        return Moments(k, mean, _sum_sq_dev(vectors, mean))

    @staticmethod
    def of_deviations(vectors: torch.Tensor) -> Moments:
        """The moments of the rows from their coordinate-wise squared deviations
        (:func:`tuneguard._rowstats.row_deviations`: one pass with shifted sums, no
        cancellation), the statistics the ``little`` attack reads too: in the local engine the
        server reuses the attack's pass over the honest submissions instead of reading them
        twice more. Equal, to float32 rounding, to :meth:`of`."""
        from tuneguard._rowstats import row_deviations

        mean, dev2 = row_deviations(vectors)
        return Moments(vectors.shape[0], mean, float(dev2.clamp_min(0.0).sum()))

    @staticmethod
    def combine(parts: list[Moments]) -> Moments:
        if len(parts) == 1:
            return parts[0]
        # in float64: the between-group term subtracts nearly equal means
        k = sum(p.k for p in parts)
        means = [p.mean.double() for p in parts]
        mean = sum(m * (p.k / k) for m, p in zip(means, parts, strict=True))
        m2 = sum(p.m2 + p.k * float((m - mean).norm()) ** 2 for m, p in zip(means, parts, strict=True))
        return Moments(k, mean.to(parts[0].mean.dtype), m2)

    @property
    def spread(self) -> float:
        """sqrt(m2 / (k - 1)), as :func:`_spread`; NaN for k < 2."""
        return math.sqrt(self.m2) / math.sqrt(self.k - 1) if self.k >= 2 else math.nan


def noise_share(spread_sample: float, spread_submit: float) -> float:
    """The share of the submitted vectors' variance that is not the batch gradients' own:

        noise_share = 1 - Var(sample) / Var(submit),   Var = E||G - E G||^2,

    with "sample" the clipped batch gradients before noise and momentum and "submit" what the
    workers send (001 E.2 compares the two VN ratios). Near 1: the DP noise (and momentum)
    dominates the spread the GAR sees, which is why the VN bound fails (001 section 4).
    Clamped to [0, 1]; NaN when either variance is unknown or the submitted one is zero."""
    if not (math.isfinite(spread_sample) and math.isfinite(spread_submit)) or spread_submit <= 0:
        return math.nan
    return min(1.0, max(0.0, 1.0 - (spread_sample / spread_submit) ** 2))


def vn_bound(gar: str | Gar, n: int | None = None, f: int | None = None, params: dict | None = None) -> float | None:
    """1 / kappa_F(n, f): the VN ratio under which the GAR's guarantee holds (None if unknown).

    ``gar``: the run's :class:`~tuneguard.aggregators.Gar` (n, f and params are its own), or a
    rule name with n, f and params. For chains (``bucketing+krum``) kappa is the final rule's
    at the vectors it sees.
    """
    from tuneguard.aggregators import Gar, build_gar

    if not isinstance(gar, Gar):
        if n is None or f is None:
            raise ValueError("vn_bound(name, n, f, params): n and f are required with a rule name")
        gar = build_gar(gar, n, f, **(params or {}))
    return gar.vn_bound()


@torch.no_grad()
def evaluate(ctx: RunContext, theta: torch.Tensor, chunk: int = 10_000) -> tuple[float, float]:
    """(top-1 accuracy, mean loss) of theta on the test set: 001's cross-accuracy."""
    ctx.set_params(theta)
    x, y = ctx.data.test_x, ctx.data.test_y
    correct, loss = 0, 0.0
    for i in range(0, len(y), chunk):
        out = ctx.model(x[i : i + chunk])
        correct += int((out.argmax(1) == y[i : i + chunk]).sum())
        loss += float(torch.nn.functional.cross_entropy(out, y[i : i + chunk], reduction="sum"))
    return correct / len(y), loss / len(y)


def step_metrics(sample: torch.Tensor, submit: torch.Tensor, R: torch.Tensor, loss: torch.Tensor,
                 grad_norm: torch.Tensor, clipped_frac: torch.Tensor) -> dict[str, float]:
    """The cheap metrics of one step, from the honest workers' vectors and the GAR output."""
    moments = Moments.of_deviations(submit)
    out = honest_metrics(sample, moments, loss, grad_norm, clipped_frac)
    out["gar_distance"] = gar_distance(R, moments.mean)
    return out


def honest_metrics(sample: torch.Tensor | Moments, submit: torch.Tensor | Moments, loss: torch.Tensor,
                   grad_norm: torch.Tensor, clipped_frac: torch.Tensor, *,
                   honest_mean: torch.Tensor | None = None) -> dict[str, float]:
    """The part of :func:`step_metrics` that needs only the honest workers' outputs (the actor
    engine computes it while the Byzantine workers craft their vectors). ``sample`` and
    ``submit``: the rows, or their :class:`Moments` (the actor engine's workers send the
    moments of their "sample" rows; :func:`tuneguard.training.server.honest_summary` passes
    the submissions' moments it computed for their mean). ``honest_mean``: the submissions'
    mean when the caller has it; the "submit" spread is then taken around it."""
    if isinstance(sample, Moments):
        sample_mean, spread_sample = sample.mean, sample.spread
    else:
        m = Moments.of(sample)
        sample_mean, spread_sample = m.mean, m.spread
    if isinstance(submit, Moments):
        honest_mean, spread_submit = submit.mean, submit.spread
    elif honest_mean is None:
        m = Moments.of_deviations(submit)
        honest_mean, spread_submit = m.mean, m.spread
    else:
        spread_submit = _spread(submit, honest_mean)
    mean_norm = float(honest_mean.norm())
    return {
        "train_loss": float(loss.mean()),
        "vn_sample": _ratio(spread_sample, float(sample_mean.norm())),
        "vn_submit": _ratio(spread_submit, mean_norm),
        "noise_share": noise_share(spread_sample, spread_submit),
        "grad_norm": float(grad_norm.mean()),
        "clipped_frac": float(clipped_frac.mean()),
        "honest_mean_norm": mean_norm,
    }


def gar_distance(R: torch.Tensor, honest_mean: torch.Tensor) -> float:
    """||R_t - mean of the honest submissions||; inf when the GAR output is not finite."""
    # A non-finite R gives a non-finite norm: no separate isfinite pass over R.
    value = float((R - honest_mean).norm())
    return value if math.isfinite(value) else math.inf


def bound_summary(history: list[dict], bound: float | None) -> dict[str, float]:
    """Why a run did (not) keep 001's robustness condition, from its per-step metrics:

        vn_bound_held_frac   = #{t : vn_submit_t < 1/kappa} / #{t with a finite vn_submit_t}
        vn_submit_over_bound_median = median_t (vn_submit_t * kappa)      (> 1: no guarantee)
        noise_share_mean     = mean_t noise_share_t                (see :func:`noise_share`)

    001 (section 4, Figure 5) finds the submitted ratio above the bound at every practical batch
    size under DP: held_frac = 0 then says the GAR's guarantee never applied in this run. Keys
    with no data (no known bound, no VN values) are left out."""
    from statistics import median

    from tuneguard.results import schema

    out: dict[str, float] = {}
    vn = [float(h["vn_submit"]) for h in history if math.isfinite(h.get("vn_submit", math.nan))]
    if bound is not None and bound > 0 and vn:
        out[schema.VN_HELD_FRAC] = sum(v < bound for v in vn) / len(vn)
        out[schema.VN_OVER_BOUND_MEDIAN] = median(v / bound for v in vn)
    shares = [float(h[schema.NOISE_SHARE]) for h in history if math.isfinite(h.get(schema.NOISE_SHARE, math.nan))]
    if shares:
        out[schema.NOISE_SHARE_MEAN] = sum(shares) / len(shares)
    return out
