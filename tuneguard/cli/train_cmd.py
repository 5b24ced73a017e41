"""``tuneguard train CONFIG.yaml``: one experiment, with a progress bar and a summary."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneguard.cli.common import console, err_console, fail, strict_json, user_errors


def train(
    config: Path = typer.Argument(..., help="experiment config YAML (see configs/)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override: key=value, dotted path or short name (gar, f, batch_size, ...)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store; default sqlite:///$TUNEGUARD_HOME/mlflow.db"),
    data_dir: str = typer.Option(None, "--data-dir", help="torchvision data root; else $TUNEGUARD_DATA_DIR"),
    engine: str = typer.Option(None, "--engine", help="local | actors"),
    address: str = typer.Option(None, "--address", help="Ray address for engine=actors (else RAY_ADDRESS, else local)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate the config and print the plan; train nothing"),
    no_track: bool = typer.Option(False, "--no-track", help="do not log to MLflow"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Train one configuration: distributed DP-SGD under Byzantine attack (001 Algorithm 1)."""
    from tuneguard.config import load_config

    overrides = list(set_)
    if data_dir:
        overrides.append(f"data_dir={data_dir}")
    if engine:
        overrides.append(f"engine={engine}")
    if address:
        overrides.append(f"actors.address={address}")
    cfg = user_errors(lambda: load_config(config, overrides))
    if dry_run:
        _dry_run(cfg)
        return
    _preflight(cfg, tracking_uri, track=not no_track)
    from tuneguard.cli.signals import Terminated, stop_on_signals

    try:
        with stop_on_signals():
            result = user_errors(lambda: _run(cfg, tracking_uri, not no_track, quiet=as_json,
                                              tags=_provenance(config)))
    except KeyboardInterrupt as err:
        name = err.args[0] if isinstance(err, Terminated) and err.args else "SIGINT"
        code = 128 + (err.signum if isinstance(err, Terminated) else 2)
        err_console.print(f"train stopped by {name}" + ("" if no_track else "; its MLflow run ended KILLED"),
                          highlight=False)
        raise typer.Exit(code) from None
    summary = result.summary()
    if as_json:
        print(strict_json(summary))
    else:
        _print_summary(cfg, result, tracking_uri)
    if result.status in ("INFEASIBLE",):
        raise typer.Exit(3)


def _preflight(cfg, tracking_uri: str | None, track: bool) -> None:
    """What can be checked before a run starts: the device, the data dir, the MLflow store
    (reachable within seconds, writable)."""
    from pathlib import Path as _P

    from tuneguard.config import check_device_available

    if cfg.engine == "local" and cfg.device != "auto":
        user_errors(lambda: check_device_available(cfg.device))
    if cfg.data_dir is not None and not _P(cfg.data_dir).expanduser().is_dir():
        fail(f"data_dir={cfg.data_dir!r} is not a directory; give the torchvision data root "
             "(the folder holding MNIST/ or FashionMNIST/) with --data-dir, or set TUNEGUARD_DATA_DIR")
    if track:
        from tuneguard.tracking import resolve_tracking_uri

        user_errors(lambda: resolve_tracking_uri(tracking_uri))


def _dry_run(cfg) -> None:
    from tuneguard.config import TRAIN_SIZES
    from tuneguard.training.plan import InfeasibleBudget, plan_privacy

    m = TRAIN_SIZES.get(cfg.dataset)  # None: a plugin dataset, its size is known once loaded
    try:
        plan = plan_privacy(cfg, m) if cfg.partition.kind == "iid" and m else None
    except InfeasibleBudget as err:
        fail(f"infeasible privacy budget: {err}", code=3)
    if cfg.device not in ("auto",):
        from tuneguard.config import ConfigError, check_device_available

        try:
            check_device_available(cfg.device)
        except ConfigError as err:
            console.print(f"[yellow]note:[/] {err} (a run on this machine would stop here)", highlight=False)
    console.print("[green]config is valid[/]")
    console.print(cfg.to_yaml(), highlight=False)
    if plan is not None:
        console.print(f"noise std sigma = {plan.sigma:.5g} on the clipped batch mean; steps = {plan.steps}; m = {plan.m}")
        for note in plan.notes:
            console.print(f"[yellow]note:[/] {note}")
    else:
        why = "non-iid partition" if m else "the dataset's size is known once loaded"
        console.print(f"privacy plan: computed after loading and partitioning the data ({why})")


def _provenance(path: Path) -> dict[str, str]:
    from tuneguard.results.export import provenance_tags

    return provenance_tags(path)


def _run(cfg, tracking_uri, track: bool, quiet: bool, tags: dict[str, str] | None = None):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from tuneguard.cli.signals import reassert
    from tuneguard.training import train as train_run

    if quiet:  # reassert: the actors engine starts Ray, which replaces the SIGTERM handler
        return train_run(cfg, tracking_uri=tracking_uri, track=track, tags=tags, callback=lambda m: reassert())
    if not console.is_terminal:  # logs and pipes: a plain line at a steady rate, not a bar drawn at the end
        return train_run(cfg, tracking_uri=tracking_uri, track=track, tags=tags, callback=_plain_lines(cfg))
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=cfg.steps, info="starting")
        state = {"acc": float("nan")}

        def on_step(m: dict) -> None:
            state["acc"] = m.get("cross_accuracy", state["acc"])
            info = (f"loss {m['train_loss']:.3f}  acc {state['acc']:.3f}  "
                    f"VN {m['vn_submit']:.3g} (bound {m.get('vn_bound', float('nan')):.3g})")
            progress.update(task, completed=m["step"], info=info)
            reassert()

        return train_run(cfg, tracking_uri=tracking_uri, track=track, tags=tags, callback=on_step)


def _plain_lines(cfg):
    """A step callback printing ``step s/T  loss  acc  VN (bound)  elapsed  ETA`` every
    ``TUNEGUARD_PROGRESS_EVERY`` seconds (default 30) and at the last step."""
    import time

    from tuneguard.cli.signals import reassert
    from tuneguard.tune.progress import _fmt_time, plain_every_s

    start = last = time.time()
    state = {"acc": float("nan"), "last": last}

    def on_step(m: dict) -> None:
        state["acc"] = m.get("cross_accuracy", state["acc"])
        now = time.time()
        if now - state["last"] >= plain_every_s() or m["step"] == cfg.steps:
            state["last"] = now
            per_step = (now - start) / max(1, m["step"])
            console.print(f"train step {m['step']}/{cfg.steps}  loss {m['train_loss']:.3f}  acc {state['acc']:.3f}  "
                          f"VN {m['vn_submit']:.3g} (bound {m.get('vn_bound', float('nan')):.3g})  "
                          f"elapsed {_fmt_time(now - start)}  ETA {_fmt_time(per_step * (cfg.steps - m['step']))}",
                          highlight=False, markup=False, soft_wrap=True)
        reassert()

    return on_step


def _print_summary(cfg, result, tracking_uri) -> None:
    from rich.table import Table

    table = Table(title=f"{cfg.dataset}: {cfg.gar.name} vs {cfg.attack.name if cfg.f else 'no attack'} (n={cfg.n_workers}, f={cfg.f}, b={cfg.batch_size})")
    table.add_column("metric")
    table.add_column("value")
    rows = [("status", result.status), ("message", result.message), ("steps", f"{result.steps}/{result.planned_steps}"),
            ("max cross-accuracy", f"{result.max_cross_accuracy:.4f}"),
            ("final cross-accuracy", f"{result.final_cross_accuracy:.4f}"),
            ("noise std sigma", f"{result.sigma:.5g}"),
            ("total epsilon spent", "-" if result.eps_spent is None else f"{result.eps_spent:.4g} (delta={cfg.privacy.delta:g}, {cfg.privacy.accountant})"),
            ("seconds", f"{result.seconds:.1f}"), ("MLflow run", result.run_id or "not tracked")]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    if result.run_id:
        from tuneguard.tracking import mask_uri, resolve_tracking_uri

        console.print(f"browse: tuneguard ui --tracking-uri {mask_uri(resolve_tracking_uri(tracking_uri))}",
                      highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
