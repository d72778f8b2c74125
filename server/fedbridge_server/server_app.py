"""Flower ServerApp: thin glue that reads the run config and runs :func:`run_federation`."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbridge_server.config import FederationConfig
from fedbridge_server.federation import run_federation


def make_server_app(
    config: FederationConfig | None = None, on_done: Callable[[dict], None] | None = None
) -> ServerApp:
    """A ServerApp; ``config`` overrides the run config (the simulate command passes it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or FederationConfig.from_flat(context.run_config)
        summary = run_federation(grid, cfg)
        if on_done:
            on_done(summary)

    return app


app = make_server_app()
