"""The coordinator on Flower's Deployment Engine: SuperLink + one ServerApp run.

``start`` launches ``flower-superlink`` (TLS and SuperNode authentication unless ``insecure``),
registers the sites' public keys, submits the fedbridge ServerApp with ``flwr run`` and streams
its log, then stops the SuperLink and its children. Everything Flower keeps (its database, its
CLI config, the app folder and the logs) lives in one state folder next to the output bundle.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console

from fedbridge_server.config import FederationConfig
from fedbridge_server.front import Front
from fedbridge_server.quorum import Stopped
from fedbridge_server.store import RoundStore
from fedbridge_shared import __version__, pki
from fedbridge_shared.errors import ConfigError, FedbridgeError
from fedbridge_shared.layout import SPEC_FILE
from fedbridge_shared.polling import wait_until
from fedbridge_shared.processes import (
    die_with_parent,
    exclusive,
    free_port,
    group_members,
    owned_by,
    sigterm_as_exit,
    spawn,
    stop,
    stop_pids,
    tool_env,
    wait_for_port,
)
from fedbridge_shared.spec import load_bundle, read_bundle_record

CONNECTION = "fedbridge"  # the SuperLink's name in Flower's CLI config
APP_NAME = "fedbridge"  # the FAB folder's name must be a valid project name


@dataclass
class Coordinator:
    """Where and how the SuperLink listens, and what it runs."""

    config: FederationConfig
    state: Path  # Flower's database, CLI config, app folder and logs
    host: str = "0.0.0.0"
    port: int = 9092
    certs: Path | None = None  # folder from `fedbridge server certs`; None only when insecure
    insecure: bool = False
    site_keys: Sequence[Path] = field(default_factory=list)
    ready_timeout: float = 60.0

    link_port: int = 0  # the SuperLink's loopback port behind the front (0: a free one)

    def __post_init__(self) -> None:
        self.state = Path(self.state).resolve()  # Flower runs with cwd=state
        if not self.insecure and not self.link_port:
            self.link_port = free_port()

    @property
    def control_address(self) -> str:
        """How this machine reaches its own SuperLink (the certificate covers localhost):
        on loopback behind the front, or (insecure rehearsal) where the sites connect."""
        if not self.insecure:
            return f"127.0.0.1:{self.link_port}"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"

    @property
    def site_address(self) -> str:
        """Where this machine reaches the address the sites use."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"

    def front(self) -> Front:
        ca, cert, key = self.tls_files()
        return Front(
            host=self.host, port=self.port, upstream=self.control_address, cert=cert, key=key,
            ca=ca, folder=self.state / "front",
        )  # fmt: skip

    def tls_files(self) -> tuple[Path, Path, Path]:
        assert self.certs is not None
        return (self.certs / pki.CA_CERT, self.certs / pki.SERVER_CERT, self.certs / pki.SERVER_KEY)

    def check(self) -> None:
        """Refuse a plan that cannot work, before any process starts."""
        if not self.insecure:
            if self.certs is None:
                raise ConfigError(
                    "TLS is on by default: give --certs DIR (make it with "
                    "`fedbridge server certs`) or pass --insecure explicitly"
                )
            pki.check_tls_files(self.tls_files())
            if not self.site_keys:
                raise ConfigError(
                    "SuperNode authentication is on: give each site's public key with --site-key "
                    "(a site makes one with `fedbridge site keys`)"
                )
        for key in self.site_keys:
            pki.check_public_key(Path(key))
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: not a TCP port")
        if not self.insecure:
            Front.binary()  # nginx present, before anything starts
        load_bundle(Path(self.config.init))  # verified before the SuperLink starts

    def superlink_command(self) -> list[str]:
        host, port = self.control_address.rsplit(":", 1)
        cmd = [
            "flower-superlink",
            "--host", host if not self.insecure else self.host,
            "--port", port,
            "--database", str(self.state / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if self.insecure:
            return [*cmd, "--insecure"]
        ca, cert, key = self.tls_files()
        return [
            *cmd,
            "--ssl-ca-certfile", str(ca.resolve()),
            "--ssl-certfile", str(cert.resolve()),
            "--ssl-keyfile", str(key.resolve()),
            "--enable-supernode-auth",
        ]  # fmt: skip


def write_app(folder: Path, config: FederationConfig) -> Path:
    """A Flower app folder whose components are the installed fedbridge apps, configured."""
    app = folder / APP_NAME
    app.mkdir(parents=True, exist_ok=True)
    doc = {
        "project": {
            "name": APP_NAME,
            "version": __version__,
            "description": "fedbridge federated target stage",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedbridge",
                    "components": {
                        "serverapp": "fedbridge_server.server_app:app",
                        "clientapp": "fedbridge_client.client_app:app",
                    },
                    "config": config.to_flat(),
                }
            }
        },
    }
    (app / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return app


def write_flwr_home(folder: Path, address: str, ca: Path | None) -> Path:
    """Flower's CLI config naming this SuperLink ``fedbridge``."""
    folder.mkdir(parents=True, exist_ok=True)
    conn: dict[str, Any] = {"address": address}
    if ca is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(ca.resolve())
    (folder / "config.toml").write_text(tomli_w.dumps({"superlink": {CONNECTION: conn}}))
    return folder


def _flwr(args: Sequence[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    proc = subprocess.run(
        ["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def check_control_api(env: dict[str, str]) -> None:
    """Raise if the SuperLink's Control API does not answer."""
    rc, text = _flwr(["supernode", "list", CONNECTION], env)
    if rc != 0:
        raise FedbridgeError(f"the SuperLink does not answer `flwr supernode list`: {_last(text)}")


def register_site(key: Path, env: dict[str, str]) -> str:
    """Register one site's public key; an already registered key is fine (state persists)."""
    rc, text = _flwr(["supernode", "register", str(Path(key).resolve()), CONNECTION], env)
    if rc == 0:
        return "registered"
    if "already" in text.lower():
        return "already registered"
    raise FedbridgeError(f"{key}: the SuperLink refused to register this key: {_last(text)}")


def _last(text: str) -> str:
    lines = [ln.strip(" │╭╮╰╯─") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Using SuperLink")]
    return " ".join(lines[-3:]) or "no output"


def start(coord: Coordinator, console: Console) -> dict[str, Any]:
    """Run the whole federation; returns the final bundle's record."""
    coord.check()
    try:
        with (
            sigterm_as_exit(),
            exclusive(coord.state / "coordinator.lock", "`fedbridge server start`"),
        ):
            _stop_orphans(coord.state, console)
            return _start(coord, console)
    except (KeyboardInterrupt, SystemExit):  # SIGINT / SIGTERM: the children are stopped
        hint = RoundStore(Path(coord.config.out)).resume_hint()
        raise Stopped(f"stopped on request. {hint}") from None


def _stop_orphans(state: Path, console: Console) -> None:
    """Stop what an earlier coordinator for this state folder left running (it was killed
    before it could: SIGKILL, the OOM killer). Only processes naming this folder, by PID."""
    orphans = owned_by(str(state))
    pid_file = state / "front" / "nginx.pid"  # nginx renames its workers: find them by group
    if pid_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            master = int(pid_file.read_text().strip())
            orphans |= group_members(master) - {os.getpid()}
    if orphans:
        console.print(
            f"stopping {len(orphans)} process(es) a killed coordinator left running for "
            f"{state}: PID {', '.join(map(str, sorted(orphans)))}"
        )
        stop_pids(orphans, timeout=20)


def _start(coord: Coordinator, console: Console) -> dict[str, Any]:
    state = coord.state
    state.mkdir(parents=True, exist_ok=True)
    ca = None if coord.insecure else coord.tls_files()[0]
    home = write_flwr_home(state / "flwr-home", coord.control_address, ca)
    env = tool_env({"FLWR_HOME": str(home)})
    app = write_app(state / "app", coord.config)
    if coord.insecure:
        console.print(
            f"SuperLink on {coord.host}:{coord.port} — INSECURE (no TLS, no SuperNode "
            f"authentication, Control API open); logs in {state}"
        )
    else:
        console.print(
            f"sites connect to {coord.host}:{coord.port} (TLS + auth; Fleet API only, via "
            f"nginx); the SuperLink and its Control API on {coord.control_address}; logs in {state}"
        )
    link = spawn(coord.superlink_command(), state / "superlink.log", env, cwd=state)
    children = [link]
    try:
        host, port = coord.control_address.rsplit(":", 1)
        if not wait_for_port(host, int(port), link, coord.ready_timeout):
            raise FedbridgeError(
                f"the SuperLink did not start; see {state / 'superlink.log'}: "
                f"{_last((state / 'superlink.log').read_text(errors='replace'))}"
            )
        if not coord.insecure:
            front = coord.front()
            proxy = spawn(front.command(), state / "front.log", env, cwd=state)
            children.append(proxy)
            site_host, site_port = coord.site_address.rsplit(":", 1)
            if not wait_for_port(site_host, int(site_port), proxy, coord.ready_timeout):
                raise FedbridgeError(
                    f"nginx (the sites' entrance) did not start on {coord.host}:{coord.port}: "
                    f"{_last((state / 'front.log').read_text(errors='replace'))} "
                    f"{_last(_read(front.folder / 'error.log'))}"
                )
        _wait_control_api(env, link, coord.ready_timeout)
        for key in coord.site_keys:
            console.print(f"site key {Path(key).name}: {register_site(Path(key), env)}")
        c = coord.config
        console.print(
            f"waiting for {c.min_available_sites} site(s) (quorum {c.min_train_sites}; first "
            f"round waits up to {c.join_timeout:g} s, later ones {c.site_wait_timeout:g} s); "
            f"{c.num_server_rounds} round(s) of {c.strategy}"
        )
        _run_app(app, env, state / "run.log", console)
    finally:
        stop(children)
    out = Path(coord.config.out)
    if not (out / SPEC_FILE).is_file():
        raise FedbridgeError(f"the run ended without a final bundle at {out}; see {state}")
    return read_bundle_record(out)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _wait_control_api(env: dict[str, str], link: subprocess.Popen, timeout: float) -> None:
    def answers() -> bool:
        try:
            check_control_api(env)
            return True
        except FedbridgeError:
            if link.poll() is not None:
                raise
            return False

    if not wait_until(answers, timeout=timeout, interval=1.0):
        check_control_api(env)  # raises the last reason it does not answer


def _run_app(app: Path, env: dict[str, str], log: Path, console: Console) -> None:
    """``flwr run APP fedbridge --stream``, echoing the ServerApp's log."""
    cmd = ["flwr", "run", str(app), CONNECTION, "--stream"]
    with open(log, "a") as fh, subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=die_with_parent(),
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                console.print(line.rstrip("\n"), markup=False, highlight=False)
            rc = proc.wait()
        except BaseException:
            stop([proc])
            raise
    if rc != 0:
        raise FedbridgeError(f"`flwr run` failed (exit {rc}); see {log}")
