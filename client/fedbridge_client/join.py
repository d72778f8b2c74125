"""A hospital site joins a real federation: a Flower SuperNode with this site's node-config.

The site's images stay where they are; the SuperNode runs the fedbridge ClientApp, which reads
``data-path`` from the node-config and sends back only weights and numeric metrics.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from fedbridge_shared import pki
from fedbridge_shared import protocol as P
from fedbridge_shared.errors import ConfigError, FedbridgeError
from fedbridge_shared.processes import sigterm_as_exit, spawn, stop, tool_env
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
    max_retries: int | None = None

    def check(self) -> dict[str, int]:
        """Refuse a bad plan before connecting; returns the image count per class."""
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", self.superlink):
            raise ConfigError(f"--superlink {self.superlink!r}: expected HOST:PORT")
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
        return usable_index(self.data).counts()  # raises DataError naming the folder

    def node_config(self) -> str:
        items = {P.NODE_DATA_PATH: str(self.data.resolve()), P.NODE_SITE_NAME: self.name}
        if self.audit_dir is not None:
            items[P.NODE_AUDIT_DIR] = str(self.audit_dir.resolve())
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
        if self.insecure:
            return [*cmd, "--insecure"]
        assert self.ca is not None and self.key is not None
        return [
            *cmd,
            "--root-certificates", str(self.ca.resolve()),
            "--auth-supernode-private-key", str(self.key.resolve()),
        ]  # fmt: skip


def _refused(log: Path, offset: int) -> bool:
    """Did the SuperNode that wrote ``log`` after ``offset`` fail to be admitted (exit 305)?"""
    with open(log, "rb") as fh:
        fh.seek(offset)
        return b"Exit Code: 305" in fh.read()


def join(node: SiteNode, log: Path, console: Console, admit_timeout: float = 600.0) -> None:
    """Run the SuperNode until Ctrl-C or SIGTERM; it serves every run the coordinator starts.

    Until the SuperLink admits this site (it may not be up yet, or not have registered the key)
    the SuperNode is restarted every few seconds, for ``admit_timeout`` seconds at most.
    """
    counts = node.check()
    mode = "INSECURE (no TLS)" if node.insecure else "TLS + key authentication"
    console.print(f"site {node.name}: {node.data} → {node.superlink} ({mode}); log {log}")
    if counts:
        console.print("images per class: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    deadline = time.monotonic() + admit_timeout
    with sigterm_as_exit():
        while True:
            offset = log.stat().st_size if log.exists() else 0
            proc = spawn(node.command(), log, tool_env())
            try:
                rc = proc.wait()
            finally:
                stop([proc])  # children (flower-superexec) outlive the SuperNode
            if rc == 0:
                return
            if not _refused(log, offset):
                raise FedbridgeError(
                    f"site {node.name}: the SuperNode exited with code {rc}; see {log}"
                )
            if time.monotonic() > deadline:
                raise FedbridgeError(f"site {node.name}: {_NOT_ADMITTED}; see {log}")
            console.print("not admitted yet (SuperLink down or key not registered); retrying")
            time.sleep(_RETRY_SECONDS)
