"""What this site did, for the site admin's console: one JSON line per message it answered.

The ClientApp runs in a process Flower starts for each message, far from the admin's terminal;
it appends ``{"round", "kind", "ok", "detail"}`` to the node-config ``events-file`` and
``fedbridge site join`` follows that file and prints each line. The full local reason of a
failure (paths included: it never leaves the site) is shown here, e.g. a label mismatch.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path


def append_event(path: str | Path, *, round_: int | None, kind: str, ok: bool, detail: str) -> None:
    entry = {"time": time.time(), "round": round_, "kind": kind, "ok": ok, "detail": detail}
    with open(path, "a", encoding="utf-8") as fh:  # one short O_APPEND write per line
        fh.write(json.dumps(entry) + "\n")


def describe_event(entry: dict) -> str:
    where = f"round {entry['round']} " if entry.get("round") is not None else ""
    if entry.get("ok"):
        return f"{where}{entry['kind']}: {entry['detail']}"
    return f"{where}{entry['kind']} REFUSED: {entry['detail']}"


class EventFollower:
    """Print every new line of an events file (from its current end) until stopped."""

    def __init__(self, path: Path, show: Callable[[dict], None], poll: float = 0.5) -> None:
        self.path, self.show, self.poll = Path(path), show, poll
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="site-events", daemon=True)

    def __enter__(self) -> EventFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.read_new()  # whatever arrived last

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.read_new()

    def read_new(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete, _, _ = chunk.rpartition("\n")
        if not complete:
            return
        self.offset += len((complete + "\n").encode("utf-8", errors="replace"))
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                self.show(entry)
