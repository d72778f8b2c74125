"""A federation's network, as between hospitals: the coordinator and each site in a network
namespace of their own, joined by veth pairs on a bridge inside the coordinator's namespace.

Addresses are assigned here, inside namespaces this module creates (10.200.0.0/24), never on
the host's own network. Where a machine cannot create namespaces (no root, no ``ip``), the
topology says so and everything runs on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

SUBNET = "10.200.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Topology:
    """Where each party runs: ``prefix(name)`` is the command prefix that enters its namespace."""

    names: list[str]
    isolated: bool = False
    why_not: str = ""
    _tag: str = field(default_factory=lambda: f"fb{os.getpid() % 100000}")

    def ns(self, name: str) -> str:
        return f"{self._tag}-{name}"

    def address(self, name: str) -> str:
        """The IP ``name`` is reached at from the other namespaces."""
        return self._assigned(name) if self.isolated else "127.0.0.1"

    def _assigned(self, name: str) -> str:
        return f"{SUBNET}.{1 + self.names.index(name)}"

    def prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name)] if self.isolated else []

    def up(self) -> Topology:
        if shutil.which("ip") is None or os.geteuid() != 0:
            self.why_not = "no `ip` command or not root"
            return self
        try:
            self._create()
        except subprocess.CalledProcessError as e:
            self.why_not = (e.stderr or str(e)).strip().splitlines()[-1]
            self.down()
            return self
        self.isolated = True
        return self

    def _create(self) -> None:
        hub, bridge = self.names[0], "fbbr0"
        for name in self.names:
            _ip("netns", "add", self.ns(name))
            _ip("-n", self.ns(name), "link", "set", "lo", "up")
        _ip("-n", self.ns(hub), "link", "add", bridge, "type", "bridge")
        _ip("-n", self.ns(hub), "addr", "add", f"{self._assigned(hub)}/24", "dev", bridge)
        _ip("-n", self.ns(hub), "link", "set", bridge, "up")
        for i, name in enumerate(self.names[1:], start=1):
            near, far = f"fbh{i}", f"fbs{i}"
            _ip("link", "add", near, "netns", self.ns(hub), "type", "veth", "peer", "name", far,
                "netns", self.ns(name))  # fmt: skip
            _ip("-n", self.ns(hub), "link", "set", near, "master", bridge)
            _ip("-n", self.ns(hub), "link", "set", near, "up")
            _ip("-n", self.ns(name), "addr", "add", f"{self._assigned(name)}/24", "dev", far)
            _ip("-n", self.ns(name), "link", "set", far, "up")

    def down(self) -> None:
        """Delete the namespaces (their veths and bridge go with them)."""
        for name in self.names:
            subprocess.run(["ip", "netns", "del", self.ns(name)], capture_output=True, timeout=30)

    def describe(self) -> str:
        if self.isolated:
            where = ", ".join(f"{n} {self.address(n)}" for n in self.names)
            return f"network namespaces: {where}"
        return f"loopback only (cannot create network namespaces: {self.why_not})"
