r"""Total privacy spent by one honest worker over T steps of Algorithm 1 (paper 001).

Mechanism, per step: the clipped batch mean of b of the worker's m points, drawn uniformly
*without replacement* (fixed size b, as tuneguard's engines do), plus
:math:`y \sim \mathcal N(0, \sigma^2 I_d)`. Adjacency: replace-one (DESIGN.md). The
clipped mean then has sensitivity :math:`2C/b`; the clipped *sum* has :math:`2C`, so every
accountant below works with the noise multiplier

.. math:: z = \frac{\sigma\, b}{2C} \quad (\text{noise std on the sum over the replace-one sensitivity}),

and sampling rate :math:`q = b/m`. The server's aggregation is post-processing.

Methods (``spent(..., method=...)``) and what each assumes:

``"rdp_wor"``  (sampling without replacement, replace-one: matches the engine)
    dp-accounting's RDP accountant (Google, ``dp_accounting.rdp.RdpAccountant`` with
    ``NeighboringRelation.REPLACE_ONE`` and ``SampledWithoutReplacementDpEvent(m, b,
    GaussianDpEvent(z))``): the strengthened subsampled-RDP bound of Wang, Balle &
    Kasiviswanathan (AISTATS 2019, Thm 27) for a mechanism run on b of m points drawn without
    replacement, replace-one adjacency, applied to the Gaussian RDP
    :math:`\varepsilon(\alpha) = \alpha/(2z^2)` (fractional orders by their Corollary 10),
    composed over T steps (RDP adds) and converted to :math:`(\varepsilon, \delta)` with the
    library's conversion (Canonne, Kamath & Steinke 2020, Prop. 12; it is never looser than
    Balle et al. 2020, Thm 21). A proof for exactly our mechanism. The closed form of Thm 9
    (:func:`rdp_wor_gaussian`, kept for reference) gives up to ~40 % more eps at
    :math:`z = 2..4`.
``"advanced"``  (sampling without replacement, replace-one: matches the engine)
    Per step: the exact (analytic) Gaussian profile at sensitivity 2C/b (Balle & Wang 2018)
    amplified by subsampling without replacement (Balle et al. 2018, Lemma 2 of 001), then
    the advanced composition theorem (Dwork, Rothblum & Vadhan 2010; the form of Kairouz et
    al. 2015): :math:`\varepsilon_{tot} = \sqrt{2T\ln(1/\delta')}\,\varepsilon +
    T\varepsilon(e^\varepsilon - 1)`, :math:`\delta_{tot} = T\delta_{step} + \delta'`, the split
    of :math:`\delta` optimised on a grid; also plain composition :math:`T\varepsilon` at
    :math:`\delta_{step} = \delta/T`; the smaller is reported. A proof for our mechanism.
``"rdp"``  (Poisson sampling at rate q)
    Opacus's RDP accountant for the Poisson-subsampled Gaussian (Mironov et al. 2019), at
    noise multiplier z. This is how paper 001 (Appendix D.2) and most codebases account.
``"prv"``  (Poisson sampling at rate q)
    Opacus's PRV accountant (Gopi et al. 2021) at the same (z, q); its upper estimate. It
    composes the "remove" direction only.
``"pld"``  (Poisson sampling at rate q)
    dp-accounting's privacy-loss-distribution accountant (``PLDAccountant``, Koskela et al.
    2020; Doroshenko et al. 2022) for ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under
    add/remove adjacency, both directions, pessimistic discretisation (interval 1e-4): an
    upper bound, usually the tightest Poisson figure.

For "rdp", "prv" and "pld" the reduction is the standard one, not proven here: the replace-one
neighbour is accounted as the add/remove pair :math:`(q\mathcal N(2C, \cdot) + (1-q)\mathcal
N(0, \cdot),\ \mathcal N(0, \cdot))` of the sum. For one step this pair bounds the privacy
profile of fixed-size sampling under replace-one for every :math:`\varepsilon \ge 0` (it is
exactly Lemma 2 applied to the exact Gaussian profile), but under composition both the
sampling scheme (Poisson vs fixed size) and the worst-case pair matter (Lebeda, Regehr,
Kamath & Steinke 2024), so these numbers are labelled with their Poisson assumption.

``"best"`` is the smallest eps among the methods whose sampling assumption matches
``sampling`` (default ``"without_replacement"``: rdp_wor and advanced; ``"poisson"``: rdp,
prv and pld; all of them when b = m, where nothing is sampled): every method is an upper
bound under its assumption, so the smallest is the tightest valid figure. The others are
still computed and reported in ``by_method`` with their assumptions.

Libraries are imported normally, on first use: dp-accounting for rdp_wor and pld, Opacus
(whose package import takes seconds) only for rdp and prv.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import _validate as V
from .gaussian import amplify, analytic_gaussian_eps

__all__ = ["METHODS", "RDP_ORDERS", "SAMPLINGS", "Spent", "rdp_wor_gaussian", "spent"]

METHODS = ("rdp", "prv", "pld", "rdp_wor", "advanced", "best")
SAMPLINGS = ("without_replacement", "poisson")
_SAMPLING_OF = {
    "rdp": "poisson",
    "prv": "poisson",
    "pld": "poisson",
    "rdp_wor": "without_replacement",
    "advanced": "without_replacement",
}

#: above this RDP epsilon the PRV and PLD accountants are skipped (see spent)
PRV_MAX_RDP_EPS = 100.0
#: RDP orders: Opacus's defaults plus 11 (which they skip) and larger ones (small eps needs
#: large alpha). Every integer up to 64 is there: the without-replacement bound is computed at
#: integer orders and interpolated between them, and its eps can bottom out at any of them.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [72, 80, 96, 128, 160, 192, 256, 384, 512, 1024]
)
#: integer orders for the closed-form Thm 9 bound of :func:`rdp_wor_gaussian`
_WOR_ORDERS = np.array(list(range(2, 64)) + [72, 80, 96, 128, 160, 192, 256], dtype=np.int64)

_ASSUMPTIONS = {
    "adjacency": "replace-one (one record of the worker's m changes); the clipped batch mean has sensitivity 2C/b",
    "noise": "sigma is the std of the Gaussian noise added to the clipped batch MEAN; accountants use z = sigma*b/(2C)",
    "rdp": "Poisson sampling at q=b/m; Opacus RDP (add/remove Poisson-subsampled Gaussian) at z = sigma*b/(2C); standard reduction, not proven for replace-one",
    "prv": "Poisson sampling at q=b/m; Opacus PRV ('remove' direction) at z = sigma*b/(2C); standard reduction, not proven for replace-one",
    "pld": "Poisson sampling at q=b/m; dp-accounting PLD (add/remove, both directions, pessimistic) at z = sigma*b/(2C); standard reduction, not proven for replace-one",
    "rdp_wor": "fixed-size batches drawn without replacement, replace-one: dp-accounting RDP (Wang-Balle-Kasiviswanathan 2019 Thm 27) (proven)",
    "advanced": "fixed-size batches drawn without replacement, replace-one: analytic Gaussian + Lemma 2 of 001 + advanced composition (proven)",
}


@dataclass
class Spent:
    """Privacy spent: ``(eps, delta)`` by ``method`` (for "best": the winning method).

    ``by_method`` holds every computed method's eps (inf where it failed), ``assumptions``
    what each rests on, ``notes`` anything the reader must know (failures, assumption
    mismatches, the Poisson-based numbers left out of "best").
    """

    eps: float
    delta: float
    method: str
    by_method: dict[str, float] = field(default_factory=dict)
    assumptions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _rdp_to_eps(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """Balle et al. 2020 (Thm 21), the conversion Opacus uses, minimised over the orders."""
    orders = np.asarray(orders, dtype=np.float64)
    eps = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    eps = eps[np.isfinite(eps)]
    return float(max(eps.min(), 0.0)) if eps.size else math.inf


def rdp_wor_gaussian(z: float, q: float, orders: np.ndarray = _WOR_ORDERS) -> np.ndarray:
    r"""One-step RDP of the Gaussian (noise multiplier z w.r.t. the replace-one sensitivity)
    run on a batch drawn without replacement at rate q: Wang, Balle & Kasiviswanathan 2019, Thm 9.

    The closed form, for reference and comparison: ``spent(method="rdp_wor")`` uses
    dp-accounting's implementation of the strengthened Thm 27, which is never larger.

    With :math:`\varepsilon(j) = j/(2z^2)` and :math:`\varepsilon(\infty) = \infty` (so the
    :math:`\min\{2, (e^{\varepsilon(\infty)}-1)^j\}` factors are 2), evaluated in log space,
    and capped by the un-subsampled Gaussian's :math:`\alpha/(2z^2)`.
    """
    orders = np.asarray(orders, dtype=np.int64)
    amax = int(orders.max())
    j = np.arange(2, amax + 1, dtype=np.float64)
    eps_j = j / (2.0 * z * z)
    log_q = math.log(q)
    # log of the j-th term without the binomial: q^j * (factor_j)
    log_term = j * log_q + math.log(2.0) + (j - 1.0) * eps_j
    e2 = 1.0 / (z * z)  # eps(2)
    log_term[0] = 2 * log_q + min(math.log(4.0) + (math.log(math.expm1(e2)) if e2 < 700 else e2), math.log(2.0) + e2)
    out = np.empty(len(orders))
    from scipy.special import gammaln

    for i, a in enumerate(orders):
        jj = j[: a - 1]
        log_binom = gammaln(a + 1.0) - gammaln(jj + 1.0) - gammaln(a - jj + 1.0)
        terms = np.concatenate(([0.0], log_binom + log_term[: a - 1]))
        top = terms.max()
        out[i] = (top + math.log(np.exp(terms - top).sum())) / (a - 1.0)
    # subsampling never hurts: with the batch indices coupled, quasi-convexity of the Renyi
    # divergence bounds the subsampled mechanism by the Gaussian itself (WBK is loose as q -> 1)
    return np.minimum(out, orders / (2.0 * z * z))


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as err:  # a declared dependency; say how to get it back
        raise ImportError("the 'rdp_wor' and 'pld' accountants need dp-accounting (pip install dp-accounting)") from err
    return dp_accounting


@functools.lru_cache(maxsize=512)
def _rdp_poisson_one_step(z: float, q: float) -> np.ndarray:
    # one step only: RDP composes additively, so T steps are T times this; the cache makes
    # the searches over T (steps_for_budget) cost one Opacus call (~50 ms) instead of dozens
    from opacus.accountants.analysis.rdp import compute_rdp

    out = np.asarray(compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(RDP_ORDERS)), dtype=np.float64)
    out.flags.writeable = False
    return out


def _eps_rdp_opacus(z: float, q: float, steps: int, delta: float) -> float:
    return _rdp_to_eps(np.array(RDP_ORDERS), steps * _rdp_poisson_one_step(z, q), delta)


def _eps_prv_opacus(z: float, q: float, steps: int, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(z, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


#: dp-accounting computes the without-replacement bound exactly up to this order (its
#: ``max_alpha``), with a Stirling approximation above
_DPA_EXACT_MAX_ORDER = 256


@functools.lru_cache(maxsize=1 << 16)
def _rdp_wor_at(z: float, b: int, m: int, order: float) -> float:
    """One step's RDP at one order, through the accountant's public API. T steps are T times
    it (RDP adds, exactly what the accountant's self-composition does)."""
    dpa = _dp_accounting()
    acc = dpa.rdp.RdpAccountant(orders=[order], neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SampledWithoutReplacementDpEvent(source_dataset_size=m, sample_size=b, event=dpa.GaussianDpEvent(z)))
    return float(acc.rdp[0])


def _eps_rdp_wor(z: float, b: int, m: int, steps: int, delta: float) -> float:
    """The library's epsilon at the best of :data:`RDP_ORDERS`, found by bisection on the slope.

    The library's bound costs O(alpha^2) Python operations per integer order up to 256 (0.3 s
    at 256; ~1 s for all the orders), so orders are evaluated lazily and cached: eps(alpha) is
    unimodal in alpha (T rdp(alpha) rises, the conversion term falls), and a bisection on the
    sign of eps(alpha_{i+1}) - eps(alpha_i) looks at ~16 orders. Above 256 the library
    switches to a cheaper, much looser bound (a jump up at 256 that breaks unimodality), so
    those few orders are evaluated apart. Whatever order it stops at, the figure is a valid
    bound; where eps is unimodal it is the minimum over all the orders.
    """
    compute_epsilon = _dp_accounting().rdp.compute_epsilon
    exact = [o for o in RDP_ORDERS if o <= _DPA_EXACT_MAX_ORDER]
    approx = [o for o in RDP_ORDERS if o > _DPA_EXACT_MAX_ORDER]

    @functools.cache
    def eps_at(order: float) -> float:
        return float(compute_epsilon([order], [steps * _rdp_wor_at(z, b, m, order)], delta)[0])

    lo, hi = 0, len(exact) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if eps_at(exact[mid + 1]) < eps_at(exact[mid]):
            lo = mid + 1
        else:
            hi = mid
    return min([eps_at(exact[lo])] + [eps_at(o) for o in approx])


def _eps_pld(z: float, q: float, steps: int, delta: float) -> float:
    dpa = _dp_accounting()
    acc = dpa.pld.PLDAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dpa.PoissonSampledDpEvent(sampling_probability=q, event=dpa.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


def _step_eps(sigma: float, sens: float, b: int, m: int, delta_step: float) -> float:
    """(eps_step, delta_step) of one step: analytic Gaussian at delta0 = delta_step*m/b, then Lemma 2."""
    delta0 = delta_step * m / b
    if delta0 >= 1.0:
        return 0.0
    eps0 = analytic_gaussian_eps(sigma, delta0, sens)
    return amplify(eps0, delta0, b, m)[0]


# fractions of delta given to delta' in advanced composition; the rest is split over the steps
_ADV_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


def _eps_advanced(sigma: float, sens: float, b: int, m: int, steps: int, delta: float) -> float:
    best = steps * _step_eps(sigma, sens, b, m, delta / steps)  # plain composition
    if steps == 1:
        return best
    for frac in _ADV_GRID:
        d_prime = frac * delta
        e = _step_eps(sigma, sens, b, m, (delta - d_prime) / steps)
        total = math.sqrt(2.0 * steps * math.log(1.0 / d_prime)) * e + steps * e * math.expm1(e)
        best = min(best, total)
    return best


def spent(
    sigma: float,
    C: float,
    b: int,
    m: int,
    steps: int,
    delta: float,
    method: str = "best",
    *,
    sampling: str = "without_replacement",
) -> Spent:
    r"""Total :math:`(\varepsilon, \delta)` of one worker after ``steps`` noisy steps.

    Args:
        sigma: std of the noise added to the clipped batch mean (Algorithm 1's s).
        C: clipping norm; b: batch size; m: the worker's local dataset size.
        steps: number of steps T the worker takes part in.
        delta: target total delta.
        method: "rdp", "prv", "pld", "rdp_wor", "advanced" or "best" (see the module docstring).
        sampling: how batches are drawn, "without_replacement" (tuneguard's engines) or
            "poisson"; decides which methods "best" may choose from.

    Returns:
        :class:`Spent`; eps is ``inf`` if the chosen method failed (see notes).
    """
    sigma = V.positive("sigma", sigma, " (the noise std on the clipped batch mean)")
    _, delta, C, b, m = V.common(None, delta, C, b, m)
    steps = V.count("steps", steps)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not an accounting method: choose one of {', '.join(METHODS)}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling={sampling!r} is not known: choose one of {', '.join(SAMPLINGS)}")

    q = b / m
    sens = 2.0 * C / b
    z = sigma / sens
    names = [n for n in METHODS if n != "best"] if method == "best" else [method]
    by_method: dict[str, float] = {}
    notes: list[str] = []
    for name in names:
        try:
            if name == "rdp":
                e = _eps_rdp_opacus(z, q, steps, delta)
            elif name in ("prv", "pld"):
                # Their discretisation domain grows with the privacy loss: at very low noise they
                # can run for minutes and still return inf; RDP (milliseconds) tells us first
                e_rdp = by_method.get("rdp")
                if e_rdp is None:
                    e_rdp = _eps_rdp_opacus(z, q, steps, delta)
                if e_rdp > PRV_MAX_RDP_EPS:
                    e = math.inf
                    notes.append(
                        f"{name} skipped: the RDP bound is already {e_rdp:.4g} > {PRV_MAX_RDP_EPS:g}, where "
                        f"the {name.upper()} accountant becomes very slow and uninformative"
                    )
                elif name == "prv":
                    e = _eps_prv_opacus(z, q, steps, delta)
                else:
                    e = _eps_pld(z, q, steps, delta)
            elif name == "rdp_wor":
                e = _eps_rdp_wor(z, b, m, steps, delta)
            else:
                e = _eps_advanced(sigma, sens, b, m, steps, delta)
        except Exception as exc:  # PRV/PLD raise for extreme (z, q, T); report, don't crash
            e = math.inf
            notes.append(f"{name} failed for z={z:.4g}, q={q:.4g}, T={steps}: {type(exc).__name__}: {exc}")
        by_method[name] = float(e)

    assumptions = {"adjacency": _ASSUMPTIONS["adjacency"], "noise": _ASSUMPTIONS["noise"]}
    assumptions.update({n: _ASSUMPTIONS[n] for n in names})
    assumptions["sampling"] = f"accounted for {sampling.replace('_', ' ')} sampling (tuneguard's engines draw fixed-size batches without replacement)"

    full_batch = b == m  # every step uses all m points: no sampling, so every method applies
    if method == "best":
        eligible = {n: e for n, e in by_method.items() if full_batch or _SAMPLING_OF[n] == sampling}
        chosen = min(eligible, key=eligible.get)
        others = {n: e for n, e in by_method.items() if n not in eligible}
        if others:
            txt = ", ".join(f"{n}={e:.4g}" for n, e in others.items())
            notes.append(
                f"not eligible for 'best' under {sampling.replace('_', ' ')} sampling: {txt} "
                f"(they assume {_SAMPLING_OF[next(iter(others))].replace('_', ' ')} sampling)"
            )
        eps = by_method[chosen]
    else:
        chosen = method
        eps = by_method[method]
        if _SAMPLING_OF[method] != sampling and not full_batch:
            notes.append(
                f"{method} assumes {_SAMPLING_OF[method].replace('_', ' ')} sampling but sampling={sampling!r}: "
                f"the number is not a guarantee for this mechanism"
            )
    if full_batch:
        notes.append("b = m: every step uses the whole local dataset, no sampling assumption is involved")
    elif _SAMPLING_OF[chosen] == "poisson":
        notes.append(
            f"{chosen}: add/remove accountant applied to replace-one via z = sigma*b/(2C) (standard reduction, "
            "not proven here; see docs/privacy.md)"
        )
    return Spent(eps=float(eps), delta=float(delta), method=chosen, by_method=by_method, assumptions=assumptions, notes=notes)
