"""The attacks: functions ``(honest [h, d], f, **params) -> [f, d]`` and their specs.

Paper 001 (Appendix D): every Byzantine worker sends ``g + zeta * a``, ``g`` the mean of the
honest submissions of the step, ``a`` the attack direction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tuneguard._rowstats import row_deviations
from tuneguard.aggregators import AGGREGATORS, Gar, build_gar

from ._spec import AttackSpec, register

DEFAULT_GENERATOR_SEED = 0
"""Seed of the generator random attacks use when none is given (same draw on every call)."""

DEFAULT_ZETAS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
"""The adaptive attack's coarse grid of zeta (it contains 1, the fixed-zeta attacks' value)."""

_GOLDEN = (math.sqrt(5) - 1) / 2


def _repeat(vector: Tensor, f: int) -> Tensor:
    return vector.unsqueeze(0).expand(f, -1).clone()


def _honest_mean_std(honest: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinate-wise mean and standard deviation of the h honest vectors, in one pass
    (:func:`tuneguard._rowstats.row_deviations`, which the step's "submit" VN ratio reads too:
    computed once a step). The mean is shared: callers must not modify it in place.

    Bessel-corrected (h - 1), as torch.var's default in the EPFL code 001 builds on
    (attacks/identical.py: grad_stck.var(dim=0).sqrt_()); h = 1 has no spread: 0.
    """
    mean, dev2 = row_deviations(honest)
    return mean, dev2.div(max(honest.shape[0] - 1, 1)).clamp_min_(0.0).sqrt_()


def _mean_and_direction(base: str, honest: Tensor) -> tuple[Tensor, Tensor]:
    """(g, a) of 001's ``g + zeta a``: little's a = -std, empire's a = -g. Every attack built
    on them computes ``g + zeta * a`` the same way, so adaptive at little's zeta is little."""
    if base == "little":
        mean, std = _honest_mean_std(honest)
        return mean, std.neg_()
    mean = honest.mean(dim=0)
    return mean, -mean


def little(honest: Tensor, f: int, zeta: float = 1.0) -> Tensor:
    r"""A little is enough (Baruch, Baruch & Goldberg, NeurIPS 2019; paper 001, App. D).

    .. math:: b = \bar g - \zeta\, \sigma, \qquad
        \sigma[k] = \sqrt{\tfrac{1}{h - 1} \textstyle\sum_i (g_i[k] - \bar g[k])^2}

    :math:`\bar g` the mean of the h honest vectors, :math:`\sigma` their coordinate-wise
    standard deviation with Bessel's correction (h - 1, as ``torch.var``'s default in the EPFL
    code paper 001 builds on; 0 when h = 1). All f Byzantine workers send b. Default
    :math:`\zeta = 1` (paper 001).
    """
    mean, direction = _mean_and_direction("little", honest)
    return _repeat(mean + zeta * direction, f)


def empire(honest: Tensor, f: int, zeta: float = 1.1) -> Tensor:
    r"""Fall of empires, inner-product manipulation (Xie, Koyejo & Gupta, UAI 2019; paper 001,
    App. D).

    .. math:: b = \bar g - \zeta \bar g = (1 - \zeta)\, \bar g

    Default :math:`\zeta = 1.1` (paper 001; epsilon = 0.1 in Xie et al.).
    """
    mean, direction = _mean_and_direction("empire", honest)
    return _repeat(mean + zeta * direction, f)


def sign_flip(honest: Tensor, f: int, scale: float = 1.0) -> Tensor:
    r"""Sign flipping: every Byzantine worker sends :math:`b = -s\, \bar g` (``scale`` s,
    default 1), the honest mean reversed (as ByzFL's SignFlipping). With s = 1 it equals
    empire at :math:`\zeta = 2`."""
    return _repeat(-scale * honest.mean(dim=0), f)


def gaussian(
    honest: Tensor, f: int, sigma: float = 200.0, generator: torch.Generator | None = None
) -> Tensor:
    r"""Gaussian vectors (Blanchard et al., NeurIPS 2017, used sigma = 200): every Byzantine
    worker sends its own draw :math:`b_j \sim \mathcal N(0, \sigma^2 I_d)`.

    Deterministic given ``generator`` (drawn on the generator's device, then moved);
    ``generator=None`` uses a fresh one seeded :data:`DEFAULT_GENERATOR_SEED`, so every call
    then draws the same vectors.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_GENERATOR_SEED)
    noise = torch.randn(
        (f, honest.shape[1]), generator=generator, device=generator.device, dtype=honest.dtype
    )
    return (sigma * noise).to(honest.device)


def nan(honest: Tensor, f: int) -> Tensor:
    """Every Byzantine worker sends a vector of NaN."""
    return honest.new_full((f, honest.shape[1]), float("nan"))


def inf(honest: Tensor, f: int) -> Tensor:
    """Every Byzantine worker sends a vector of +Inf."""
    return honest.new_full((f, honest.shape[1]), float("inf"))


def zero(honest: Tensor, f: int) -> Tensor:
    """Crash failure, modelled as every Byzantine worker sending the zero vector. (A worker
    that sends nothing is not modelled: the server always aggregates n vectors.)"""
    return honest.new_zeros((f, honest.shape[1]))


def mimic(honest: Tensor, f: int, target: int = 0) -> Tensor:
    """Mimic (Karimireddy, He & Jaggi, ICLR 2022): every Byzantine worker copies honest vector
    ``target``, over-weighting one worker's data (harmful under heterogeneity)."""
    return _repeat(honest[target], f)


def label_flip(honest: Tensor, f: int) -> Tensor:
    """Data attack: the Byzantine workers compute honest-looking gradients on flipped labels
    (label y becomes C - 1 - y). The training engine runs it; there is nothing to craft here."""
    raise ValueError("label_flip is a data attack: the training engine applies it")


def _as_gar(gar: str | Gar, n: int, gar_f: int, gar_params: Mapping[str, Any]) -> Gar:
    """The server's rule as a :class:`Gar` on n vectors with gar_f. A prebuilt Gar is reused as
    is when n and f match, and keeps its own parameters (``gar_params`` then only lends the
    step's generator); a name is built with ``gar_params``."""
    if isinstance(gar, Gar):
        if gar.n == n and gar.f == gar_f:
            return gar
        return build_gar(gar.name, n, gar_f, **gar.params)
    return build_gar(gar, n, gar_f, **gar_params)


def line_search_zeta(
    honest: Tensor,
    f: int,
    gar: str | Gar,
    base: str = "little",
    gar_params: Mapping[str, Any] | None = None,
    gar_f: int | None = None,
    zetas: Sequence[float] | None = None,
    refine: int = 8,
) -> tuple[float, float]:
    """The zeta (and its damage) maximising ``|GAR(honest + f x (g + zeta a)) - g|``.

    Evaluates the coarse grid ``zetas`` (default :data:`DEFAULT_ZETAS`), then ``refine``
    golden-section steps between the best grid point's neighbours; returns the best seen. For a
    sign-based rule the damage is measured against ``sign(g)``. A generator in ``gar_params``
    is restored before every evaluation and at the end: each candidate faces the shuffle the
    server will draw, and the server's generator is left untouched.
    """
    gar_params = dict(gar_params or {})
    gar_f = f if gar_f is None else gar_f
    server = _as_gar(gar, honest.shape[0] + f, gar_f, gar_params)
    mean, direction = _mean_and_direction(base, honest)
    target = mean.sign() if server.sign_based else mean
    gen = gar_params.get("generator")
    state = gen.get_state() if isinstance(gen, torch.Generator) else None
    byz = torch.empty((f, honest.shape[1]), dtype=honest.dtype, device=honest.device)
    stacked = torch.cat([honest, byz])

    def damage(zeta: float) -> float:
        stacked[honest.shape[0] :] = mean + zeta * direction
        if state is not None:
            gen.set_state(state)
        out = server(stacked, generator=gen)
        value = float(torch.linalg.vector_norm((out - target).to(torch.float64)))
        return value if math.isfinite(value) else math.inf

    grid = sorted(float(z) for z in (DEFAULT_ZETAS if zetas is None else zetas))
    scores = [damage(z) for z in grid]
    best = max(range(len(grid)), key=scores.__getitem__)
    best_zeta, best_damage = grid[best], scores[best]
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = (damage(a), damage(b)) if refine >= 2 and hi > lo else (-math.inf, -math.inf)
    for _ in range(max(refine - 2, 0) if hi > lo else 0):
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = damage(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = damage(b)
    for z, s in ((a, fa), (b, fb)):
        if s > best_damage:
            best_zeta, best_damage = z, s
    if state is not None:
        gen.set_state(state)
    return best_zeta, best_damage


def adaptive(
    honest: Tensor,
    f: int,
    gar: str | None = None,
    base: str = "little",
    gar_params: Mapping[str, Any] | None = None,
    gar_f: int | None = None,
    zetas: Sequence[float] | None = None,
    refine: int = 8,
) -> Tensor:
    r"""GAR-aware attack: ``base`` (little or empire) with :math:`\zeta` line-searched to
    maximise the damage :math:`\|\mathrm{GAR}(g_1..g_h, b, .., b) - \bar g\|` (the EPFL code's
    negative ``factor``; Baruch et al. and Xie et al. tune zeta the same way).

    ``gar`` (required) is any rule or chain name, run like
    :func:`tuneguard.aggregators.aggregate` with ``n = h + f`` vectors, ``gar_f`` (default f)
    as its f and ``gar_params``; or the server's prebuilt :class:`~tuneguard.aggregators.Gar`
    (the training step passes the run's), which keeps its own parameters and takes only the
    generator from ``gar_params``. Cost: ``len(zetas) + refine`` aggregations per call (20 by
    default). See :func:`line_search_zeta`.
    """
    assert gar is not None  # checked in _check_adaptive
    zeta, _ = line_search_zeta(honest, f, gar, base, gar_params, gar_f, zetas, refine)
    mean, direction = _mean_and_direction(base, honest)
    return _repeat(mean + zeta * direction, f)


def _number(name: str, value: Any, positive: bool = False) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"{name} must be a finite number; got {value!r}"
    if positive and value <= 0:
        return f"{name} must be > 0; got {value!r}"
    return None


def _check_zeta(h: int, f: int, p: Mapping[str, Any]) -> str | None:
    return _number("zeta", p["zeta"])


def _check_scale(h: int, f: int, p: Mapping[str, Any]) -> str | None:
    return _number("scale", p["scale"])


def _check_mimic(h: int, f: int, p: Mapping[str, Any]) -> str | None:
    t = p["target"]
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < h:
        return f"target must be an index of an honest vector, 0 <= target < h = {h}; got {t!r}"
    return None


def _check_gaussian(h: int, f: int, p: Mapping[str, Any]) -> str | None:
    gen = p["generator"]
    if gen is not None and not isinstance(gen, torch.Generator):
        return f"generator must be a torch.Generator or None; got {type(gen).__name__}"
    return _number("sigma", p["sigma"], positive=True)


def _check_adaptive(h: int, f: int, p: Mapping[str, Any]) -> str | None:
    gar = p["gar"]
    if gar is None:
        rules = ", ".join(s.name for s in AGGREGATORS.values() if not s.is_pre)
        return f"needs gar=<rule or chain the server uses>, e.g. gar='median'; rules: {rules}"
    if not isinstance(gar, str | Gar):
        return f"gar must be a rule or chain name or a Gar; got {type(gar).__name__}"
    if p["base"] not in ("little", "empire"):
        return f"base must be 'little' or 'empire'; got {p['base']!r}"
    refine = p["refine"]
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        return f"refine must be an integer >= 0; got {refine!r}"
    zetas = p["zetas"]
    if zetas is not None:
        if len(zetas) == 0:
            return "zetas must be a non-empty sequence of numbers >= 0"
        for z in zetas:
            if _number("each zeta", z) or z < 0:
                return f"zetas must be numbers >= 0; got {z!r}"
    gar_params = p["gar_params"]
    if gar_params is not None and not isinstance(gar_params, Mapping):
        return f"gar_params must be a mapping of parameters for {gar!r}; got {type(gar_params).__name__}"
    gar_f = f if p["gar_f"] is None else p["gar_f"]
    if f > 0:
        try:
            _as_gar(gar, h + f, gar_f, dict(gar_params or {}))
        except ValueError as err:
            return f"the server's rule cannot run on n = h + f = {h + f} vectors: {err}"
    return None


register(
    AttackSpec(
        name="little",
        fn=little,
        params={"zeta": 1.0},
        extra_check=_check_zeta,
        description="all send mean - zeta * std of the honest vectors (coordinate-wise, Bessel)",
        reference="Baruch et al., NeurIPS 2019; paper 001 App. D",
    )
)
register(
    AttackSpec(
        name="empire",
        fn=empire,
        params={"zeta": 1.1},
        extra_check=_check_zeta,
        description="all send (1 - zeta) * honest mean",
        reference="Xie, Koyejo & Gupta, UAI 2019; paper 001 App. D",
    )
)
register(
    AttackSpec(
        name="sign_flip",
        fn=sign_flip,
        params={"scale": 1.0},
        extra_check=_check_scale,
        description="all send -scale * honest mean",
        reference="e.g. Allen-Zhu et al., ICLR 2021; ByzFL SignFlipping",
    )
)
register(
    AttackSpec(
        name="gaussian",
        fn=gaussian,
        params={"sigma": 200.0, "generator": None},
        extra_check=_check_gaussian,
        needs_generator=True,
        omniscient=False,
        description="each sends its own N(0, sigma^2 I) draw (generator=None: seed 0)",
        reference="Blanchard et al., NeurIPS 2017",
    )
)
register(
    AttackSpec(
        name="nan",
        fn=nan,
        omniscient=False,
        description="all send NaN vectors",
        reference="LPD-EPFL/ByzantineMomentum attacks/nan.py (non-finite gradients)",
    )
)
register(
    AttackSpec(
        name="inf",
        fn=inf,
        omniscient=False,
        description="all send +Inf vectors",
        reference="LPD-EPFL/ByzantineMomentum attacks/nan.py (non-finite gradients)",
    )
)
register(
    AttackSpec(
        name="zero",
        fn=zero,
        omniscient=False,
        description="crash modelled as zero vectors (absent vectors are not modelled)",
        reference="crash failure",
    )
)
register(
    AttackSpec(
        name="mimic",
        fn=mimic,
        params={"target": 0},
        extra_check=_check_mimic,
        description="all copy honest vector number `target`",
        reference="Karimireddy, He & Jaggi, ICLR 2022",
    )
)
register(
    AttackSpec(
        name="adaptive",
        fn=adaptive,
        params={
            "gar": None,
            "base": "little",
            "gar_params": None,
            "gar_f": None,
            "zetas": None,
            "refine": 8,
        },
        extra_check=_check_adaptive,
        description="little/empire with zeta line-searched to maximise |GAR(...) - mean| "
        "(gar required)",
        reference="Baruch et al. 2019; Xie et al. 2019; EPFL code's line search",
    )
)
register(
    AttackSpec(
        name="label_flip",
        fn=label_flip,
        omniscient=False,
        data_attack=True,
        description="data attack: Byzantine workers train on flipped labels (engine-side)",
        reference="e.g. Allen-Zhu et al., ICLR 2021; Karimireddy et al., ICLR 2022",
    )
)
