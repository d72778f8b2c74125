"""``fedbridge federate simulate``: every site on this machine through Flower's simulation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedbridge_shared.cli.options import Seed, make_console

app = typer.Typer(help="Federated target stage over hospital sites.", no_args_is_help=True)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``key=value`` strings (dotted kebab-case run-config keys) to a dict."""
    from fedbridge_shared.errors import ConfigError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. dp.enabled=true")
        out[key.strip()] = value.strip()
    return out


@app.command()
def simulate(
    init: Annotated[Path, typer.Option(help="Bridge bundle to start from.")],
    sites: Annotated[list[Path], typer.Option("--site", help="A site's class folders (repeat).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Final (best-round) bundle.")],
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    strategy: Annotated[str, typer.Option(help="fedavg | fedprox | fedadam")] = "fedavg",
    augment_per_sample: Annotated[int, typer.Option(help="Offline ×N expansion per site.")] = 10,
    augment: Annotated[str, typer.Option(help="Augmentation preset: cxr | oct | none.")] = "cxr",
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    lr: Annotated[float, typer.Option(help="Local AdamW learning rate.")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = 16,
    val: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Server-side validation set for best-round selection."),
    ] = None,
    test: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Test set assessed with the final bundle."),
    ] = None,
    settings: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--set", help="Any run-config key, e.g. --set dp.enabled=true."),
    ] = None,
    audit_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write a JSON-lines audit of every message each site sends."),
    ] = None,
    seed: Seed = 0,
) -> None:
    """Run the sites on this machine through Flower's simulation runtime."""
    from fedbridge_server.simulate import simulate as run

    flat = {
        "init": str(init),
        "out": str(out_dir),
        "num-server-rounds": rounds,
        "strategy": strategy,
        "augment-per-sample": augment_per_sample,
        "augment": augment,
        "local-epochs": local_epochs,
        "lr": lr,
        "batch-size": batch_size,
        "seed": seed,
        "val-data": str(val or ""),
        "test-data": str(test or ""),
        "min-train-sites": len(sites),
        "min-evaluate-sites": len(sites),
        "min-available-sites": len(sites),
        **parse_overrides(settings or []),
    }
    run(flat, sites, make_console(), make_console(stderr=True), audit_dir=audit_dir)
