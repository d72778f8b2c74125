"""What this site did, for the site admin's console: one JSON line per message it answered.

The ClientApp runs in a process Flower starts for each message, far from the admin's terminal;
it appends ``{"round", "rounds", "kind", "ok", "detail", "metrics", "labels"}`` to the
node-config ``events-file`` and ``fedbridge site join`` follows that file and prints each line
in words (:func:`describe_event`): "round 2 of 3: trained on 12 images (CNV 5, DME 4,
DRUSEN 0, NORMAL 3) …; update sent". The full local reason of a failure (paths included: it
never leaves the site) is shown here, e.g. a label mismatch.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedbridge_shared import protocol as P

STARTED = "started"  # the detail of the event written when a task arrives


def append_event(
    path: str | Path,
    *,
    round_: int | None,
    kind: str,
    ok: bool,
    detail: str,
    rounds: int | None = None,
    metrics: dict[str, Any] | None = None,
    labels: list[str] | None = None,
) -> None:
    """One line of the events file; ``metrics`` are the reply's numbers (what was sent)."""
    entry = {"time": time.time(), "round": round_, "kind": kind, "ok": ok, "detail": detail}
    extra = {"rounds": rounds, "metrics": metrics, "labels": labels}
    entry.update({k: v for k, v in extra.items() if v is not None})
    with open(path, "a", encoding="utf-8") as fh:  # one short O_APPEND write per line
        fh.write(json.dumps(entry) + "\n")


def describe_event(entry: dict) -> str:
    """An event in words; the last evaluation of a run adds "run finished" on a second line."""
    rnd, rounds = entry.get("round"), entry.get("rounds")
    where = ""
    if rnd is not None:
        where = f"round {rnd} of {rounds}: " if rounds else f"round {rnd}: "
    kind = str(entry.get("kind", "task"))
    if not entry.get("ok"):
        return f"{where}{kind} REFUSED: {entry.get('detail', '')}"
    metrics = entry.get("metrics")
    if entry.get("detail") == STARTED:
        return f"{where}{kind} started"
    if not isinstance(metrics, dict):  # an older line: the detail as it was written
        return f"{where}{kind}: {entry.get('detail', '')}"
    text = where + _in_words(kind, metrics, entry.get("labels") or [])
    if rnd is not None and rnd == rounds and kind == "evaluation":
        text += f"\nrun finished: all {rounds} round(s) done; waiting for the next run"
    return text


def _in_words(kind: str, metrics: dict[str, Any], labels: list[str]) -> str:
    reply = (P.TrainReply if kind == "training" else P.EvalReply).from_metrics(metrics)
    n = int(reply.num_examples)
    counts = reply.counts_by_label(labels) if labels else {}
    if not counts and reply.class_counts:
        counts = {f"class {i}": c for i, c in enumerate(reply.class_counts)}
    per_class = f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else ""
    if isinstance(reply, P.TrainReply):
        return (
            f"trained on {n} image(s){per_class}: loss {reply.train_loss:.3f}, accuracy "
            f"{reply.train_accuracy:.3f}, {reply.seconds:.1f} s; update sent to the coordinator"
        )
    if n == 0:
        return "no validation images here: nothing to check; sent"
    return (
        f"checked the new global model on {n} validation image(s){per_class}: accuracy "
        f"{reply.val_accuracy:.3f}, loss {reply.val_loss:.3f}; result sent to the coordinator"
    )


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
