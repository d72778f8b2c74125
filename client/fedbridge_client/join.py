"""A hospital site joins a real federation: a Flower SuperNode with this site's node-config.

The site's images stay where they are; the SuperNode runs the fedbridge ClientApp, which reads
``data-path`` from the node-config and sends back only weights and numeric metrics.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fedbridge_client.events import EventFollower, describe_event
from fedbridge_shared import pki
from fedbridge_shared import protocol as P
from fedbridge_shared.errors import ConfigError, FedbridgeError
from fedbridge_shared.polling import wait_until
from fedbridge_shared.processes import (
    exclusive,
    owned_by,
    sigterm_as_exit,
    spawn,
    stop,
    stop_pids,
    tool_env,
)
from fedbridge_shared.shortcut import check_mapped_folders
from fedbridge_shared.training import usable_index

_NOT_ADMITTED = (
    "the SuperLink did not admit this site: it is unreachable or this site's public key is not "
    "registered (send NAME.pub to the coordinator for `fedbridge server start --site-key`)"
)
_RETRY_SECONDS = 5.0


@dataclass
class SiteNode:
    """How one site connects: the coordinator's address, its data, its credentials."""

    superlink: str
    data: Path
    name: str
    ca: Path | None = None
    key: Path | None = None
    insecure: bool = False
    runtime_port: int = 9094
    audit_dir: Path | None = None
    events: Path | None = None  # the ClientApp's events file that `join` prints
    max_retries: int | None = None
    max_wait: float | None = None  # seconds the SuperNode tries to reach a SuperLink that is down
    worker_socket: Path | None = None  # the site worker's socket (set by `join`)
    label_map: dict[str, tuple[str, ...]] = field(default_factory=dict)  # see Site

    def check(self) -> dict[str, int]:
        """Refuse a bad plan before connecting; returns the image count per class."""
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", self.superlink):
            raise ConfigError(f"--superlink {self.superlink!r}: expected HOST:PORT")
        if not 1 <= self.runtime_port <= 65535:
            raise ConfigError(f"--runtime-port {self.runtime_port}: must be in [1, 65535]")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ConfigError(f"--name {self.name!r}: use letters, digits, '-', '_' or '.'")
        if not self.insecure:
            if self.ca is None or self.key is None:
                raise ConfigError(
                    "TLS and SuperNode authentication are on by default: give --ca (the "
                    "coordinator's ca.crt) and --key (from `fedbridge site keys`), or --insecure"
                )
            pki.check_tls_files([self.ca])
            if not self.key.is_file():
                raise ConfigError(f"{self.key}: private key not found")
        counts = usable_index(self.data).counts()  # raises DataError naming the folder
        check_mapped_folders(self.label_map, counts, where=self.data)
        return counts

    def node_config(self) -> str:
        """The SuperNode's node-config; with a worker (``join``) the data folder is not in it:
        only the worker, installed fedbridge code, knows where the images are."""
        items = {P.NODE_SITE_NAME: self.name}
        if self.worker_socket is None:
            items[P.NODE_DATA_PATH] = str(self.data.resolve())
        if self.audit_dir is not None:
            items[P.NODE_AUDIT_DIR] = str(self.audit_dir.resolve())
        if self.events is not None:
            items[P.NODE_EVENTS_FILE] = str(Path(self.events).resolve())
        if self.worker_socket is not None:
            items[P.NODE_WORKER_SOCKET] = str(self.worker_socket)
        for k, v in items.items():
            if "'" in v or '"' in v:
                raise ConfigError(f"{v}: quotes are not allowed in {k}")
        return " ".join(f"{k}='{v}'" for k, v in items.items())

    def command(self) -> list[str]:
        cmd = [
            "flower-supernode",
            "--superlink", self.superlink,
            "--port", str(self.runtime_port),
            "--node-config", self.node_config(),
        ]  # fmt: skip
        if self.max_retries is not None:
            cmd += ["--max-retries", str(self.max_retries)]
        if self.max_wait is not None:
            cmd += ["--max-wait-time", f"{max(1.0, self.max_wait):.0f}"]
        if self.insecure:
            return [*cmd, "--insecure"]
        assert self.ca is not None and self.key is not None
        return [
            *cmd,
            "--root-certificates", str(self.ca.resolve()),
            "--auth-supernode-private-key", str(self.key.resolve()),
        ]  # fmt: skip


def _log_since(log: Path, offset: int) -> str:
    with open(log, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode("utf-8", errors="replace")


def _cause(node: SiteNode, text: str) -> str | None:
    """The real reason a SuperNode stopped, from its log, when it is one that will not pass."""
    low = text.lower()
    if "certificate_verify_failed" in low:
        return (
            f"the coordinator's TLS certificate is not signed by --ca {node.ca} "
            "(CERTIFICATE_VERIFY_FAILED): ask the coordinator for its current ca.crt"
        )
    if "address already in use" in low or "errno 98" in low:
        return (
            f"--runtime-port {node.runtime_port} is in use on this machine (another site or "
            "program); give each site on a host its own --runtime-port"
        )
    return None


def join(node: SiteNode, log: Path, console: Console, admit_timeout: float = 600.0) -> None:
    """Run the SuperNode until Ctrl-C or SIGTERM; it serves every run the coordinator starts.

    Until the SuperLink admits this site (it may be down, restarting with a new run, or not have
    registered the key yet) the SuperNode is restarted every few seconds, for ``admit_timeout``
    seconds at most each time; a cause that cannot pass (a wrong CA, the runtime port in use)
    stops at once with that cause. What the site does in each round is printed as it happens.
    """
    counts = node.check()
    mode = "INSECURE (no TLS)" if node.insecure else "TLS + key authentication"
    console.print(f"site {node.name}: {node.data} → {node.superlink} ({mode}); log {log}")
    console.print(
        "this site runs only fedbridge's own app (installed code); any other app is refused "
        "and recorded"
    )
    if node.ca is not None and not node.insecure:
        console.print(  # one unbroken line: the admin compares it byte by byte
            f"CA SHA-256 fingerprint: {pki.fingerprint(node.ca)} (compare it with the one the "
            "coordinator reads you over a second channel)",
            soft_wrap=True,
        )
    if counts:
        console.print("images per class: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if node.events is None:
        node.events = log.with_name(log.name.removesuffix(".log") + "-events.jsonl")
    lock = log.with_name(log.name + ".lock")
    with sigterm_as_exit(), exclusive(lock, f"`fedbridge site join` for {log}"):
        _stop_strays(node.events, console)
        with _worker(node, log, console) as worker:
            _serve(node, log, console, admit_timeout, worker)


_WORKER_START_TIMEOUT = 600.0  # seconds for the worker to import torch/timm on a slow device


class _SiteWorker:
    """The site's long-lived worker process (see :mod:`fedbridge_client.worker`), restarted
    when it dies between or during runs."""

    def __init__(self, node: SiteNode, log: Path, console: Console, socket: Path) -> None:
        self.node, self.log, self.console, self.socket = node, log, console, socket
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from fedbridge_client.worker import READY

        self.socket.unlink(missing_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0
        assert self.node.events is not None
        cmd = [
            sys.executable, "-m", "fedbridge_client.worker",
            "--socket", str(self.socket),
            "--data", str(self.node.data.resolve()),
            "--name", self.node.name,
            "--owner", f"{P.NODE_EVENTS_FILE}='{Path(self.node.events).resolve()}'",
        ]  # fmt: skip
        for name, targets in self.node.label_map.items():
            cmd += ["--label-map", f"{name}={'|'.join(targets)}"]
        self.proc = spawn(cmd, self.log, tool_env())
        proc = self.proc

        def ready() -> bool:
            text = _log_since(self.log, offset)
            if READY in text:
                return True
            if proc.poll() is not None:
                raise FedbridgeError(
                    f"site {self.node.name}: the site worker stopped: {_last_line(text)}; "
                    f"see {self.log}"
                )
            return False

        if wait_until(ready, timeout=_WORKER_START_TIMEOUT, interval=0.2):
            return
        raise FedbridgeError(
            f"site {self.node.name}: the site worker was not ready within "
            f"{_WORKER_START_TIMEOUT:g} s; see {self.log}"
        )

    def keep_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.console.print(f"the site worker exited (code {self.proc.returncode}); restarting")
            self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop([self.proc])


@contextlib.contextmanager
def _worker(node: SiteNode, log: Path, console: Console) -> Iterator[_SiteWorker]:
    """Start the worker on a socket in a fresh 0700 folder; stop it and remove that folder."""
    folder = Path(tempfile.mkdtemp(prefix="fedbridge-site-"))
    worker = _SiteWorker(node, log.with_name(log.stem + "-worker.log"), console, folder / "w.sock")
    node.worker_socket = worker.socket
    _guard_shim(folder / "bin")
    try:
        worker.start()
        console.print(f"site worker ready (PID {worker.proc.pid}); log {worker.log}")
        yield worker
    finally:
        worker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _guard_shim(bindir: Path) -> None:
    """``bindir/flwr-clientapp``: :mod:`fedbridge_client.guard` under the name the SuperNode
    starts for each message, so only fedbridge's installed ClientApp runs at this site."""
    bindir.mkdir(mode=0o700)
    shim = bindir / "flwr-clientapp"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedbridge_client.guard "$@"\n')
    shim.chmod(0o700)


def _supernode_env(node: SiteNode) -> dict[str, str]:
    env = tool_env()
    if node.worker_socket is not None:  # the guard first on PATH (see _guard_shim)
        env["PATH"] = os.pathsep.join([str(node.worker_socket.parent / "bin"), env["PATH"]])
    return env


def _stop_strays(events: Path, console: Console) -> None:
    """A SuperNode whose `site join` was killed dies with it (PDEATHSIG); one that survived
    anyway names this site's events file in its --node-config: stop it (by PID)."""
    strays = owned_by(f"{P.NODE_EVENTS_FILE}='{Path(events).resolve()}'")
    if strays:
        console.print(f"stopping a SuperNode left by a killed `site join`: PID {sorted(strays)}")
        stop_pids(strays, timeout=20)


def _serve(
    node: SiteNode, log: Path, console: Console, admit_timeout: float, worker: _SiteWorker
) -> None:
    deadline = time.monotonic() + admit_timeout
    show = lambda entry: console.print(describe_event(entry), markup=False, highlight=False)  # noqa: E731
    assert node.events is not None
    with EventFollower(node.events, show):
        while True:
            offset = log.stat().st_size if log.exists() else 0
            node.max_wait = max(1.0, deadline - time.monotonic())
            proc = spawn(node.command(), log, _supernode_env(node))
            console.print(
                f"waiting for the coordinator at {node.superlink} "
                f"(admission tried for up to {node.max_wait:.0f} s)",
                highlight=False,
            )
            try:
                rc = _wait(proc, worker, functools.partial(_admitted, log, offset, console))
            finally:
                stop([proc])  # children (flower-superexec) outlive the SuperNode
            text = _log_since(log, offset)
            cause = _cause(node, text)
            if cause:
                raise FedbridgeError(f"site {node.name}: {cause}; see {log}")
            # connected at some point (Flower logs the node id once the SuperLink accepted it):
            # a coordinator that ended or restarted; else it never got in and the deadline holds
            served = "SuperNode ID:" in text or "Receiving:" in text
            if served:  # it was connected: the coordinator ended or restarted; wait afresh
                deadline = time.monotonic() + admit_timeout
            elif time.monotonic() >= deadline - 1:  # --max-wait-time ran out as well
                raise FedbridgeError(
                    f"site {node.name}: {_NOT_ADMITTED} (tried for {admit_timeout:g} s); see {log}"
                )
            elif rc not in (0, 305) and "Exit Code: 305" not in text:
                raise FedbridgeError(
                    f"site {node.name}: the SuperNode exited with code {rc}: {_last_line(text)}; "
                    f"see {log}"
                )
            console.print(
                "disconnected; reconnecting (the coordinator may be restarting)"
                if served
                else "not admitted yet (SuperLink down or key not registered); retrying"
            )
            time.sleep(_RETRY_SECONDS)


def _wait(proc: subprocess.Popen, worker: _SiteWorker, admitted: Callable[[], bool]) -> int:
    """The SuperNode's exit code; the site worker is restarted meanwhile if it dies, and the
    admission is announced once (``admitted()`` true once it was printed)."""
    said = False
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=2.0)
        worker.keep_alive()
        said = said or admitted()


def _admitted(log: Path, offset: int, console: Console) -> bool:
    """Print "admitted" once the SuperNode's log (since ``offset``) shows the SuperLink took
    it in (Flower logs the node id then); true once printed."""
    found = re.search(r"SuperNode ID: (\d+)", _log_since(log, offset))
    if found:
        console.print(
            f"admitted by the coordinator (node {found.group(1)}); waiting for a run",
            highlight=False,
        )
    return found is not None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][-200:] if lines else "no output"
