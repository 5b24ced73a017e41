"""``tuneguard list aggregators|attacks|models|datasets``: the registries as tables."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

list_app = typer.Typer(help="List the registered aggregation rules, attacks, models or datasets.",
                       no_args_is_help=True)


@list_app.command("aggregators")
def list_aggregators() -> None:
    """Every gradient aggregation rule: its (n, f) requirement, VN constant kappa, reference."""
    from tuneguard.aggregators import AGGREGATORS

    table = Table(title="Aggregation rules (GARs)")
    for col in ("name", "requires", "kappa(n, f)", "kappa at n=15, f=3", "parameters", "reference"):
        table.add_column(col, overflow="fold")
    for spec in AGGREGATORS.values():
        try:
            k = spec.kappa(15, 3)
            k_txt = "-" if k is None else f"{k:.3g}"
        except ValueError:
            k_txt = "n/a"
        params = ", ".join(f"{p}={v!r}" for p, v in spec.params.items()) or "-"
        table.add_row(spec.name, spec.requirement, spec.kappa_formula or "unknown", k_txt, params, spec.reference)
    Console().print(table)
    Console().print("Pre-aggregation wrappers compose with any rule: e.g. [bold]nnm+krum[/], [bold]bucketing+median[/].")


@list_app.command("attacks")
def list_attacks() -> None:
    """Every Byzantine attack: what it sends, its parameters, reference."""
    from tuneguard.attacks import ATTACKS

    table = Table(title="Byzantine attacks")
    for col in ("name", "kind", "parameters", "description", "reference"):
        table.add_column(col, overflow="fold")
    for spec in ATTACKS.values():
        params = ", ".join(f"{p}={v!r}" for p, v in spec.params.items()) or "-"
        kind = "data (engine)" if spec.data_attack else "vector"
        table.add_row(spec.name, kind, params, spec.description, spec.reference)
    Console().print(table)


@list_app.command("models")
def list_models() -> None:
    """Every built-in model: its parameters (``model_params``) and reference; any
    ``package.module:callable`` returning an nn.Module works too."""
    from tuneguard.models import MODELS

    table = Table(title="Models (model:)")
    for col in ("name", "parameters (model_params)", "description", "reference"):
        table.add_column(col, overflow="fold")
    for spec in MODELS.values():
        params = ", ".join(f"{p}={v!r}" for p, v in spec.params.items()) or "-"
        table.add_row(spec.name, params, spec.description, spec.reference or "-")
    Console().print(table)
    Console().print("Your own: [bold]model: package.module:callable[/] (called with input_shape, num_classes "
                    "and model_params; returns an nn.Module; BatchNorm is refused, use GroupNorm).")


@list_app.command("datasets")
def list_datasets() -> None:
    """Every built-in dataset: shape, classes, size and preprocessing; torchvision classes and
    import paths work too."""
    from tuneguard.data import DATASETS

    table = Table(title="Datasets (dataset:)")
    for col in ("name", "input shape", "classes", "train size", "preprocessing", "reference"):
        table.add_column(col, overflow="fold")
    for spec in DATASETS.values():
        table.add_row(spec.name, "x".join(map(str, spec.input_shape)), str(spec.num_classes),
                      f"{spec.train_size:,}", spec.preprocessing, spec.reference or "-")
    Console().print(table)
    Console().print("Also: [bold]dataset: torchvision:NAME[/] (e.g. torchvision:CIFAR10, with dataset_params) "
                    "or [bold]package.module:callable[/] returning train/test tensors or datasets.")


def register(app: typer.Typer) -> None:
    app.add_typer(list_app, name="list")
