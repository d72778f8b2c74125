"""The listener's persistent outbox: pending after a failure, back-off, reload, permissions."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path

import pytest

from fedbridge_edge import outbox as ob
from fedbridge_edge.outbox import Outbox, Unreachable, backoff, private_dir, private_write


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Pacs:
    """A fake send: down (Unreachable), or up, recording what it got."""

    def __init__(self) -> None:
        self.up = False
        self.calls: list[list[str]] = []
        self.got: list[str] = []

    def __call__(self, paths: list[Path]) -> list[str | None]:
        self.calls.append([p.name for p in paths])
        if not self.up:
            raise Unreachable("cannot connect to PACS")
        self.got += [p.read_text() for p in paths]
        return [None] * len(paths)


def results(root: Path, stem: str) -> list[Path]:
    return [private_write(root / "1.2.3" / f"{stem}{s}", stem.encode()) for s in (".sc", ".sr")]


def test_backoff_doubles_up_to_the_cap():
    assert [backoff(n) for n in range(0, 9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff(10_000, base=0.5, cap=5) == 5


def test_a_failed_send_stays_pending_and_is_retried_on_the_backoff_schedule(tmp_path):
    clock, pacs = Clock(), Pacs()
    box = Outbox(tmp_path, pacs, destination="PACS", clock=clock)
    box.put(Outbox.key("1.2.3", "1"), results(tmp_path, "1"), "M:1")
    clock.now += 0.001  # arrival order
    box.put(Outbox.key("1.2.3", "2"), results(tmp_path, "2"), "M:2")
    tries = []
    for _ in range(7):  # the PACS is down: one connection attempt per back-off, not per entry
        before = len(pacs.calls)
        box.run_once()
        if len(pacs.calls) > before:
            tries.append(clock.now)
        clock.now += 1.0
    assert len(pacs.calls) == 3, pacs.calls  # at t = 0, 1, 3 (delays 1 s, 2 s, then 4 s)
    assert [t - tries[0] for t in tries] == [0, 1, 3]
    pending = box.pending()
    assert len(pending) == 2
    first = pending[0]
    assert first.label == "M:1" and first.last_error == "cannot connect to PACS"
    assert first.attempts == 3 and first.next_try == pytest.approx(tries[-1] + 4)
    status = box.write_status()
    assert status["pending"] == 2 and status["last_error"] == "cannot connect to PACS"
    assert json.loads((tmp_path / "outbox" / "status.json").read_text())["pending"] == 2
    assert "2 pending for PACS" in Outbox.describe(status)

    pacs.up = True
    clock.now = first.next_try
    assert box.run_once() == 2
    assert box.pending() == [] and pacs.got == ["1", "1", "2", "2"]
    assert not list((tmp_path / "outbox").glob("*.send.json"))
    assert box.write_status()["pending"] == 0


def test_pending_sends_survive_a_restart_and_go_first(tmp_path):
    clock, pacs = Clock(), Pacs()
    box = Outbox(tmp_path, pacs, destination="PACS", clock=clock)
    box.put(Outbox.key("1.2.3", "1"), results(tmp_path, "1"), "M:1")
    for _ in range(5):
        box.run_once()
        clock.now += 100
    (tmp_path / "outbox" / ".x.send.json.abc.tmp").write_text("{")  # a crash mid-write
    assert box.pending()[0].attempts == 5

    pacs2 = Pacs()
    pacs2.up = True
    again = Outbox(tmp_path, pacs2, destination="PACS", clock=clock)  # a new process
    assert not list((tmp_path / "outbox").glob(".*.tmp"))
    [entry] = again.pending()
    assert entry.attempts == 5 and entry.files == ["1.2.3/1.sc", "1.2.3/1.sr"]
    clock.now -= 1000  # its next try lies ahead; on start it is due at once anyway
    assert again.run_once(force=True) == 1 and pacs2.got == ["1", "1"]


def test_sender_thread_delivers_after_the_pacs_comes_back(tmp_path, caplog):
    pacs = Pacs()
    box = Outbox(tmp_path, pacs, destination="PACS", base_delay=0.05, max_delay=0.2,
                 status_every=0.1)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fedbridge.edge.listen.outbox"):
        box.start()
        try:
            box.put(Outbox.key("1.2.3", "1"), results(tmp_path, "1"), "M:1")
            deadline = time.monotonic() + 10
            while len(pacs.calls) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(pacs.calls) >= 3
            pacs.up = True
            while box.pending() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not box.pending()
            while "empty" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            box.close(timeout=5)
    assert "outbox: 1 pending for PACS" in caplog.text
    assert "outbox: empty, everything delivered to PACS" in caplog.text
    assert not box.thread.is_alive()


def test_a_resend_replaces_the_pending_entry(tmp_path):
    clock, pacs = Clock(), Pacs()
    box = Outbox(tmp_path, pacs, destination="PACS", clock=clock)
    key = Outbox.key("1.2.3", "1")
    box.put(key, results(tmp_path, "1"), "M:1")
    box.run_once()
    clock.now += 10
    box.put(key, results(tmp_path, "1"), "M:1 again")
    [entry] = box.pending()
    assert entry.attempts == 0 and entry.label == "M:1 again"
    assert entry.created == 1_000_000.0  # the age counts from the first queueing


def test_files_and_folders_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        root = tmp_path / "out"
        private_dir(root)
        box = Outbox(root, Pacs(), destination="PACS")
        box.put(Outbox.key("1.2.3", "1"), results(root, "1"), "M:1")
        box.run_once()
        box.write_status()
    finally:
        os.umask(old)
    dirs = [root, root / "outbox", root / "1.2.3"]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == 4, files  # two results, one entry, status.json
    for d in dirs:
        assert stat.S_IMODE(d.stat().st_mode) == ob.DIR_MODE, d
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == ob.FILE_MODE, f
