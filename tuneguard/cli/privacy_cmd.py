"""``tuneguard privacy``: per-step noise (both calibrations) and the total budget over T steps.

Three ways to call it (sigma is always the std of the noise on the clipped batch mean):

- ``--eps-step E``: the per-step noise of Theorem 1 (paper 001) and of the analytic Gaussian
  mechanism, then the total (eps, delta) after ``--steps`` for each sigma and accountant;
  with ``--target-eps``, also the steps each sigma allows.
- ``--sigma S``: the total budget of that noise; with ``--target-eps``, the steps it allows.
- ``--target-eps E`` alone: the noise that keeps ``--steps`` steps within (E, delta).
"""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer

ALL_ACCOUNTANTS = ("rdp", "prv", "pld", "rdp_wor", "advanced")
_SOLVE_DEFAULT = ("rdp", "rdp_wor", "advanced")


def _fail(msg: str) -> None:
    typer.echo(f"Error: {msg}", err=True)
    raise typer.Exit(code=2)


def _fmt(v: float) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.4g}"


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def privacy(
    batch: Annotated[int, typer.Option("--batch", help="Batch size b per worker per step.")],
    eps_step: Annotated[float | None, typer.Option("--eps-step", help="Per-step, per-worker epsilon to calibrate the noise for.")] = None,
    sigma: Annotated[float | None, typer.Option("--sigma", help="Noise std on the clipped batch mean (instead of --eps-step).")] = None,
    target_eps: Annotated[float | None, typer.Option("--target-eps", help="Total epsilon over the run: solve for the noise (or the steps).")] = None,
    delta: Annotated[float, typer.Option("--delta", help="delta (per step with --eps-step; also the total delta).")] = 1e-5,
    clip: Annotated[float, typer.Option("--clip", help="Per-example clipping norm C.")] = 2.0,
    dataset_size: Annotated[int, typer.Option("--dataset-size", help="Local dataset size m of a worker.")] = 60000,
    steps: Annotated[int, typer.Option("--steps", help="Number of steps T.")] = 300,
    sampling: Annotated[str, typer.Option("--sampling", help="How batches are drawn: without_replacement (tuneguard) or poisson; picks the methods 'best' may use.")] = "without_replacement",
    accountants: Annotated[str | None, typer.Option("--accountants", help="Comma-separated subset of rdp,prv,pld,rdp_wor,advanced (default: all; rdp,rdp_wor,advanced when solving: PRV and PLD are slow to invert).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Per-step DP noise for each calibration and the total privacy budget by each accountant."""
    from tuneguard.privacy import SAMPLINGS

    if eps_step is not None and sigma is not None:
        _fail("give either --eps-step (calibrate the noise) or --sigma (a given noise), not both")
    if eps_step is None and sigma is None and target_eps is None:
        _fail("nothing to compute: give --eps-step, --sigma or --target-eps")
    if sampling not in SAMPLINGS:
        _fail(f"--sampling {sampling!r} is not known: choose one of {', '.join(SAMPLINGS)}")
    solving = target_eps is not None
    if accountants is None:
        names = list(_SOLVE_DEFAULT if solving else ALL_ACCOUNTANTS)
    else:
        names = [a.strip() for a in accountants.split(",") if a.strip()]
        bad = [a for a in names if a not in ALL_ACCOUNTANTS]
        if bad or not names:
            _fail(f"--accountants {accountants!r}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(ALL_ACCOUNTANTS)}")
    try:
        result = _compute(eps_step, sigma, target_eps, delta, clip, batch, dataset_size, steps, sampling, names)
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(_jsonable(result), indent=2))
    else:
        _print(result)


def _compute(eps_step, sigma, target_eps, delta, clip, batch, m, steps, sampling, names) -> dict:
    from tuneguard.privacy import _validate as V
    from tuneguard.privacy import calibrate, noise_for_budget, spent, steps_for_budget

    # validate under the options' own names, so the error line says what to change
    if eps_step is not None:
        V.positive("--eps-step", eps_step)
    V.probability("--delta", delta)
    V.positive("--clip", clip, " (the per-example clipping norm C)")
    V.count("--batch", batch)
    V.count("--dataset-size", m)
    if batch > m:
        raise ValueError(
            f"--batch={batch} is larger than --dataset-size={m}: batches are drawn without "
            "replacement from the worker's local data, so --batch must be <= --dataset-size"
        )
    V.count("--steps", steps)
    if target_eps is not None:
        V.positive("--target-eps", target_eps)
    if sigma is not None:
        V.positive("--sigma", sigma, " (the noise std on the clipped batch mean)")

    inputs = {
        "eps_step": eps_step, "sigma": sigma, "target_eps": target_eps, "delta": delta, "clip": clip,
        "batch": batch, "dataset_size": m, "steps": steps, "sampling": sampling, "accountants": names,
    }
    out: dict = {"inputs": inputs, "per_step": [], "totals": [], "assumptions": {}, "notes": []}

    def totals_for(label: str, s: float) -> dict:
        by = {}
        best_note = []
        for name in names:
            sp = spent(s, clip, batch, m, steps, delta, method=name, sampling=sampling)
            by[name] = sp.eps
            out["assumptions"].update(sp.assumptions)
            out["notes"].extend(n for n in sp.notes if n not in out["notes"] and "assumes" not in n)
        eligible = {n: e for n, e in by.items() if batch == m or n in _ELIGIBLE[sampling]}
        best = min(eligible, key=eligible.get) if eligible else None
        if best is None:
            best_note.append(f"none of the chosen accountants assumes {sampling} sampling")
        return {"noise": label, "sigma": s, "eps": by, "best": best, "best_eps": by.get(best) if best else None, "notes": best_note}

    sigmas: list[tuple[str, float]] = []
    if eps_step is not None:
        for method in ("theorem1", "analytic"):
            cal = calibrate(eps_step, delta, clip, batch, m, method=method)
            out["per_step"].append({
                "calibration": method, "sigma": cal.sigma, "noise_multiplier": cal.noise_multiplier,
                "inner_eps": cal.inner_eps, "inner_delta": cal.inner_delta, "valid": cal.valid,
                "sufficient": cal.sufficient, "notes": cal.notes,
            })
            sigmas.append((method, cal.sigma))
    elif sigma is not None:
        sigmas.append(("given", sigma))

    for label, s in sigmas:
        out["totals"].append(totals_for(label, s))

    if target_eps is not None:
        if sigmas:
            out["steps_for_budget"] = [
                {"noise": label, "sigma": s, "steps": {
                    n: steps_for_budget(s, target_eps, delta, clip, batch, m, accountant=n) for n in names}}
                for label, s in sigmas
            ]
        else:
            rows = []
            for n in names:
                s = noise_for_budget(target_eps, delta, clip, batch, m, steps, accountant=n)
                rows.append({"accountant": n, "sigma": s, "noise_multiplier": s * batch / (2 * clip),
                             "eps_at_sigma": spent(s, clip, batch, m, steps, delta, method=n).eps})
            out["noise_for_budget"] = rows
            for n in names:
                out["assumptions"].update(spent(rows[0]["sigma"], clip, batch, m, 1, delta, method=n).assumptions)
    return out


_ELIGIBLE = {"without_replacement": ("rdp_wor", "advanced"), "poisson": ("rdp", "prv", "pld")}


def _print(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    inp = res["inputs"]
    setting = (f"C={inp['clip']:g}, b={inp['batch']}, m={inp['dataset_size']}, delta={inp['delta']:g}, "
               f"sampling={inp['sampling']}")
    if res["per_step"]:
        t = Table(title=f"Per-step noise per worker for eps_step={inp['eps_step']:g} ({setting})")
        for col in ("calibration", "sigma (std on clipped mean)", "z = sigma b/(2C)", "inner eps", "inner delta", "proof holds", "sigma suffices"):
            t.add_column(col)
        for r in res["per_step"]:
            t.add_row(r["calibration"], _fmt(r["sigma"]), _fmt(r["noise_multiplier"]), _fmt(r["inner_eps"]),
                      _fmt(r["inner_delta"]), "yes" if r["valid"] else "[bold red]NO[/]",
                      "yes" if r["sufficient"] else "[bold red]NO[/]")
        con.print(t)
        for r in res["per_step"]:
            for n in r["notes"]:
                con.print(f"[yellow]warning ({r['calibration']}):[/] {n}")
    if res["totals"]:
        names = inp["accountants"]
        t = Table(title=f"Total budget after T={inp['steps']} steps (delta={inp['delta']:g})")
        t.add_column("noise")
        t.add_column("sigma")
        for n in names:
            t.add_column(f"eps {n}")
        t.add_column("best (valid for the sampling)")
        for r in res["totals"]:
            best = f"{_fmt(r['best_eps'])} ({r['best']})" if r["best"] else "-"
            t.add_row(r["noise"], _fmt(r["sigma"]), *[_fmt(r["eps"][n]) for n in names], best)
        con.print(t)
        for n in dict.fromkeys(n for r in res["totals"] for n in r["notes"]):
            con.print(f"[yellow]note:[/] {n}")
    if "steps_for_budget" in res:
        names = inp["accountants"]
        t = Table(title=f"Steps allowed within total eps={inp['target_eps']:g} (delta={inp['delta']:g})")
        t.add_column("noise")
        t.add_column("sigma")
        for n in names:
            t.add_column(f"steps {n}")
        for r in res["steps_for_budget"]:
            t.add_row(r["noise"], _fmt(r["sigma"]), *[str(r["steps"][n]) for n in names])
        con.print(t)
    if "noise_for_budget" in res:
        t = Table(title=f"Noise for total eps={inp['target_eps']:g} over T={inp['steps']} steps ({setting})")
        for col in ("accountant", "sigma (std on clipped mean)", "z = sigma b/(2C)", "eps at sigma"):
            t.add_column(col)
        for r in res["noise_for_budget"]:
            t.add_row(r["accountant"], _fmt(r["sigma"]), _fmt(r["noise_multiplier"]), _fmt(r["eps_at_sigma"]))
        con.print(t)
    for n in res["notes"]:
        con.print(f"[yellow]note:[/] {n}")
    if res["assumptions"]:
        con.print("[bold]Assumptions[/]")
        for k, v in res["assumptions"].items():
            con.print(f"  {k}: {v}")


def register(app: typer.Typer) -> None:
    app.command("privacy")(privacy)
