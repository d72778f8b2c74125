"""Run a federation on one machine with Flower's simulation runtime (one SuperNode per site).

Both ends in one process: this is why it lives in the app, above the server and the client.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fedbridge_client.client_app import make_client_app
from fedbridge_client.site import Site
from fedbridge_server.config import FederationConfig
from fedbridge_server.quorum import Stopped
from fedbridge_server.server_app import make_server_app
from fedbridge_server.store import RoundStore
from fedbridge_shared.errors import ConfigError, FedbridgeError
from fedbridge_shared.processes import descendants, process_table, stop_pids
from fedbridge_shared.spec import load_bundle


def site_maps(
    sites: Sequence[Path], label_map: Mapping[str, Sequence[str]] | None
) -> list[dict[str, tuple[str, ...]]]:
    """Each site's part of ``--label-map``: the names it has a class folder of. A name no site
    has is a typo: ConfigError."""
    label_map = dict(label_map or {})
    maps = [{k: tuple(v) for k, v in label_map.items() if (Path(s) / k).is_dir()} for s in sites]
    unused = [k for k in label_map if not any(k in m for m in maps)]
    if unused:
        raise ConfigError(f"--label-map {unused[0]}: no --site has a class folder of that name")
    return maps


def preflight(
    cfg: FederationConfig,
    sites: Sequence[Path],
    label_maps: Sequence[Mapping[str, Sequence[str]]] = (),
) -> None:
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
        site = Site(path, f"site-{i}", label_maps[i - 1] if label_maps else None)
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
    label_map: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Run the federation; returns the server's summary (history, best round, test metrics).

    SIGINT/SIGTERM end it within seconds (:class:`Shutdown`): the completed rounds stay saved,
    the same call resumes, and no Ray process or temporary folder is left behind.
    """
    from flwr.simulation import run_simulation

    cfg = FederationConfig.from_flat(flat)
    paths = [str(Path(s).resolve()) for s in sites]
    maps = site_maps([Path(p) for p in paths], label_map)
    preflight(cfg, [Path(p) for p in paths], maps)
    summary: dict[str, Any] = {}
    failed: list[FedbridgeError] = []
    with Shutdown() as shutdown:
        server = make_server_app(
            cfg, on_done=summary.update, on_error=failed.append,
            stop=shutdown.stop, on_exit=shutdown.server_ended.set,
        )  # fmt: skip
        client = make_client_app(
            paths, mods=mods, audit_dir=str(Path(audit_dir).resolve()) if audit_dir else None,
            label_maps=maps,
        )  # fmt: skip
        try:
            run_simulation(
                server_app=server, client_app=client, num_supernodes=len(paths),
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"_temp_dir": str(shutdown.ray_dir)},
                },
            )  # fmt: skip
        except (KeyboardInterrupt, SystemExit):  # Ray's own SIGTERM handler raises SystemExit
            shutdown.request()
        except RuntimeError:  # Flower's runtime, torn down under a ServerApp that already ended
            if not failed and not shutdown.stop.is_set():
                raise
    if failed:
        raise failed[0]
    if shutdown.stop.is_set():
        raise Stopped(f"stopped on request. {RoundStore(Path(cfg.out)).resume_hint()}")
    if not summary:
        raise FedbridgeError("the federation did not finish; see the log above")
    out.print(f"federated bundle: {summary['bundle']} (best round {summary['best_round']})")
    return summary


class Shutdown:
    """Ends a simulation within seconds of SIGINT/SIGTERM, or of the ServerApp's end.

    A signal sets ``stop``: the round loop ends at its next poll. Flower then waits for the
    ClientApps still training in Ray, however long; so once the ServerApp ended without
    finishing (stopped, or every site dropped by ``round-timeout``), the Ray workers still
    busy are ended after ``grace`` seconds. On exit every process the simulation started (Ray's
    raylet, GCS, workers: our descendants that were not there before) is ended by PID, and
    Ray's temporary folder removed.
    """

    def __init__(self, grace: float = 3.0) -> None:
        self.stop, self.server_ended, self.grace = threading.Event(), threading.Event(), grace
        self._done = threading.Event()
        self._before: set[int] = set()
        self._previous: dict = {}
        self.ray_dir = Path(tempfile.mkdtemp(prefix="fedbridge-ray-"))

    def request(self, *_: object) -> None:
        """What SIGINT/SIGTERM do; a second one ends the Ray workers at once."""
        if self.stop.is_set():
            self._end_workers()
        self.stop.set()

    def __enter__(self) -> Shutdown:
        self._before = descendants([os.getpid()])
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self.request)
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        left = descendants([os.getpid()]) - self._before
        if left:
            stop_pids(left, timeout=10)
        shutil.rmtree(self.ray_dir, ignore_errors=True)

    def _watch(self) -> None:
        self.server_ended.wait()
        if self._done.wait(self.grace):
            return  # the simulation ended by itself
        self._end_workers()

    def _end_workers(self) -> None:
        """SIGTERM the Ray worker processes we started: a ClientApp still training ends, so
        Flower's wait for it ends too (its error is logged, no reply is waited for)."""
        table = process_table()
        workers = {
            pid
            for pid in descendants([os.getpid()]) - self._before
            if "ray::" in table.get(pid, (0, ""))[1]
            or "default_worker.py" in table.get(pid, (0, ""))[1]
        }
        if workers:
            stop_pids(workers, timeout=5)
