"""Flower ServerApp: thin glue that reads the run config and runs :func:`run_federation`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbridge_server.config import FederationConfig
from fedbridge_server.federation import run_federation
from fedbridge_server.round_loop import Clock
from fedbridge_shared.errors import ConfigError, FedbridgeError
from fedbridge_shared.polling import wait_until


def make_server_app(
    config: FederationConfig | None = None,
    on_done: Callable[[dict], None] | None = None,
    on_error: Callable[[FedbridgeError], None] | None = None,
    *,
    stop: threading.Event | None = None,
    on_exit: Callable[[], None] | None = None,
) -> ServerApp:
    """A ServerApp; ``config`` overrides the run config (the simulate command passes it).

    With ``on_error`` a fedbridge error (a lost quorum, a bad bundle) is handed over instead of
    raised, so the caller can show it as one line. ``stop`` set ends the run at the round
    loop's next poll (a signal handler sets it); ``on_exit`` is called however ``main`` ends.
    Without ``stop``, SIGINT/SIGTERM to the process running ``main`` (``flwr-serverapp``, when
    it runs it in its main thread) stop the run the same way.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        event = stop or threading.Event()
        try:
            with _stop_on_signals(event if stop is None else None):
                cfg = config or _from_flower(context.run_config)
                if config is None and cfg.simulation_sites:
                    _check_supernodes(grid, cfg.min_available_sites)
                summary = run_federation(grid, cfg, clock=Clock(stop=event))
        except FedbridgeError as e:
            if on_error is None:
                raise
            on_error(e)
            return
        finally:
            if on_exit:
                on_exit()
        if on_done:
            on_done(summary)

    return app


app = make_server_app()


@contextlib.contextmanager
def _stop_on_signals(event: threading.Event | None):
    """While the block runs, SIGINT/SIGTERM set ``event`` (only in the main thread)."""
    if event is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: event.set()) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


PATH_KEYS = ("init", "out", "val-data", "test-data")


def _from_flower(run_config) -> FederationConfig:
    """The run config as ``flwr run`` hands it over: paths must be absolute, since the
    ServerApp runs in Flower's own folder, not where the user typed the command."""
    cfg = FederationConfig.from_flat(run_config)
    flat = cfg.to_flat()
    sims = [p for p in str(cfg.simulation_sites).split(",") if p]
    for key, value in [
        *((k, flat[k]) for k in PATH_KEYS),
        *(("simulation-sites", p) for p in sims),
    ]:
        if value and not Path(str(value)).is_absolute():
            raise ConfigError(
                f"run config: {key} {value!r} is relative, but `flwr run` starts the ServerApp "
                f"in Flower's own folder; give an absolute path, e.g. --run-config "
                f"\"{key}='{Path(str(value)).resolve()}'\""
            )
    if sims:  # `flwr run . local`: one SuperNode per site folder, or the extra folders idle
        cfg = cfg.replace(min_available_sites=len(sims))
    return cfg


def _check_supernodes(grid: Grid, sites: int, settle: float = 10.0) -> None:
    """In ``flwr run . local`` every SuperNode exists from the start: fewer than the site
    folders means Flower's ``num-supernodes`` (default 2) is lower, and a folder would idle."""
    nodes: list[int] = []

    def all_there() -> bool:
        nodes[:] = grid.get_node_ids()
        return len(nodes) >= sites

    if not wait_until(all_there, timeout=settle, interval=0.5):
        raise ConfigError(
            f"run config: simulation-sites lists {sites} folders but Flower's simulation has "
            f"{len(nodes)} SuperNodes; set options.num-supernodes = {sites} for this SuperLink "
            "connection in $FLWR_HOME/config.toml"
        )
