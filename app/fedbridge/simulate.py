"""Run a federation on one machine with Flower's simulation runtime (one SuperNode per site).

Both ends in one process: this is why it lives in the app, above the server and the client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fedbridge_client.client_app import make_client_app
from fedbridge_client.site import Site
from fedbridge_server.config import FederationConfig
from fedbridge_server.server_app import make_server_app
from fedbridge_shared.errors import ConfigError, FedbridgeError
from fedbridge_shared.spec import load_bundle


def preflight(cfg: FederationConfig, sites: Sequence[Path]) -> None:
    """Check the init bundle and every site's labels before starting any process."""
    if len(sites) < 1:
        raise ConfigError("give at least one --site")
    if cfg.min_available_sites > len(sites):
        raise ConfigError(
            f"run config: min-available-sites is {cfg.min_available_sites} but only "
            f"{len(sites)} --site folder(s) are given; the federation would wait for sites "
            "that cannot come"
        )
    seen: dict[Path, Path] = {}
    for path in sites:
        key = Path(path).resolve()
        if key in seen:
            raise ConfigError(f"--site {path}: given twice (as {seen[key]}); each site once")
        seen[key] = Path(path)
    spec = load_bundle(Path(cfg.init)).spec
    if cfg.target_labels():  # the federation retargets the bridge's head to these
        spec = dataclasses.replace(spec, labels=cfg.target_labels())
    for i, path in enumerate(sites, start=1):
        site = Site(path, f"site-{i}")
        try:
            site.check_labels(spec)
        except FedbridgeError as e:
            raise type(e)(f"{path}: {e}") from e


def simulate(
    flat: dict[str, Any],
    sites: Sequence[Path],
    *,
    out: Console,
    mods: Sequence = (),
    audit_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the federation; returns the server's summary (history, best round, test metrics)."""
    from flwr.simulation import run_simulation

    cfg = FederationConfig.from_flat(flat)
    paths = [str(Path(s).resolve()) for s in sites]
    preflight(cfg, [Path(p) for p in paths])
    summary: dict[str, Any] = {}
    failed: list[FedbridgeError] = []
    run_simulation(
        server_app=make_server_app(cfg, on_done=summary.update, on_error=failed.append),
        client_app=make_client_app(
            paths, mods=mods, audit_dir=str(Path(audit_dir).resolve()) if audit_dir else None
        ),
        num_supernodes=len(paths),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if failed:
        raise failed[0]
    if not summary:
        raise FedbridgeError("the federation did not finish; see the log above")
    out.print(f"federated bundle: {summary['bundle']} (best round {summary['best_round']})")
    return summary
