"""Bounded waits for sites: every wait has a deadline, and a quorum decides whether to go on.

Flower's strategies wait for ``min_available_nodes`` in an endless loop; fedbridge waits here
instead, then hands the strategy a snapshot of the connected nodes, so a node that disappears
between the check and the sampling cannot start that endless loop again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flwr.serverapp import Grid

from fedbridge_shared.errors import FedbridgeError
from fedbridge_shared.polling import wait_until

log = logging.getLogger("fedbridge.server")


class QuorumError(FedbridgeError):
    """Too few sites to go on: the run stops; its completed rounds stay resumable."""


class Stopped(FedbridgeError):
    """A stop was asked for (SIGINT/SIGTERM): the run ends; its completed rounds are kept."""


def _stopping(stop: threading.Event | None, what: str) -> None:
    if stop is not None and stop.is_set():
        raise Stopped(f"{what}: stopped on request")


def wait_for_sites(
    grid: Grid,
    *,
    expected: int,
    quorum: int,
    timeout: float,
    what: str,
    poll: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    stop: threading.Event | None = None,
    progress: Callable[[list[int], float], None] | None = None,
    progress_every: float = 30.0,
) -> list[int]:
    """The connected node ids once ``expected`` are connected, or at ``timeout`` if at least
    ``quorum`` are; otherwise :class:`QuorumError` naming how many came.

    ``progress(nodes, seconds_left)`` is called when the wait starts, whenever the connected
    set changes and every ``progress_every`` seconds; ``stop`` set raises :class:`Stopped`.
    """
    deadline = clock() + timeout
    nodes: list[int] = []
    shown: list[int] | None = None
    next_note = clock()

    def all_came() -> bool:
        nonlocal shown, next_note
        _stopping(stop, what)
        nodes[:] = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return True
        if clock() < deadline and (nodes != shown or clock() >= next_note):
            log.info("%s: waiting for sites, %d of %d connected", what, len(nodes), expected)
            if progress is not None:
                progress(list(nodes), max(0.0, deadline - clock()))
            shown, next_note = list(nodes), clock() + progress_every
        return False

    if wait_until(all_came, timeout=timeout, interval=poll, clock=clock, sleep=sleep):
        return nodes
    if len(nodes) >= quorum and nodes:
        log.warning(
            "%s: %d of %d expected sites connected after %g s; going on with the quorum",
            what, len(nodes), expected, timeout,
        )  # fmt: skip
        return nodes
    raise QuorumError(
        f"{what}: {len(nodes)} of {expected} expected sites connected after {timeout:g} "
        f"s, fewer than the quorum of {quorum} (min-train-sites)"
    )


def exchange(
    grid: Grid,
    messages: list,
    *,
    timeout: float,
    poll: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    stop: threading.Event | None = None,
) -> list:
    """Send ``messages`` and collect their replies until all came or ``timeout`` passed.

    Flower's ``Grid.send_and_receive`` does the same but looks for replies every 3 s; a round
    has two such waits, so at ``poll`` = 0.5 s a deployed round ends ~5 s sooner.
    """
    waiting = set(grid.push_messages(messages))
    replies: list = []

    def all_replied() -> bool:
        _stopping(stop, "waiting for the sites' replies")
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        return not waiting

    if waiting:
        wait_until(all_replied, timeout=timeout, interval=poll, clock=clock, sleep=sleep)
    return replies


class SnapshotGrid:
    """A grid whose ``get_node_ids`` is a fixed list (what :func:`wait_for_sites` returned);
    everything else goes to the real grid."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
