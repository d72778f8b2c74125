"""A persistent outbox: results wait on disk until the PACS has them, across restarts and crashes.

Each pending send is one JSON file, ``OUT/outbox/<id>.send.json``, written atomically (temp file
beside it, fsync, rename, fsync of the folder): the result files to send (paths relative to
``OUT``), the attempts so far, the next try's time and the last error. One sender thread tries
the due entries in arrival order; a delivered entry is removed, a failed one is tried again after
an exponential back-off (1 s, 2 s, 4 s… capped at ``max_delay``). While the destination cannot be
reached at all nothing else is tried before that back-off ends, so a PACS that is down costs one
connection attempt per back-off, not one per entry. On start every entry left by an earlier run
(a restart, a SIGKILL, a power cut) is due at once.

How far behind it is stays visible: ``OUT/outbox/status.json`` (pending count, oldest entry's
age, next try, last error) and, while anything is pending, one log line every ``status_every``
seconds. Everything here is private to the service user: folders 0700, files 0600, whatever the
umask. No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedbridge_shared.files import atomic_write

log = logging.getLogger("fedbridge.edge.listen.outbox")

DIR_MODE = 0o700
FILE_MODE = 0o600
BASE_DELAY = 1.0  # seconds before the second try
MAX_DELAY = 60.0  # the back-off's cap
STATUS_EVERY = 60.0  # seconds between status log lines while entries are pending
TICK = 5.0  # the sender looks at the folder at least this often (status.json refresh)
SUFFIX = ".send.json"
STATUS = "status.json"


class Unreachable(Exception):
    """The destination cannot be reached at all (no association): every entry would fail."""


# files → one error (None: delivered) per file, in order; raises Unreachable
SendFn = Callable[[list[Path]], list[str | None]]


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """``path`` and its missing parents, each created 0700 whatever the umask (existing folders
    are left as they are) and made durable in its parent."""
    path = Path(path)
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(p, DIR_MODE)  # mkdir's mode is masked by the umask
        fsync_dir(p.parent)
    return path


def private_write(path: Path, data: bytes) -> Path:
    """Write ``data`` atomically as a 0600 file, durable once this returns (file and folder
    fsynced). The temp file lies beside ``path``, never in the system temp folder."""
    path = Path(path)
    private_dir(path.parent)
    atomic_write(path, data, mode=FILE_MODE)
    fsync_dir(path.parent)
    return path


def backoff(attempts: int, *, base: float = BASE_DELAY, cap: float = MAX_DELAY) -> float:
    """Seconds to wait after ``attempts`` failed tries: base, 2·base, 4·base… at most ``cap``."""
    if attempts <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(attempts - 1, 62))


@dataclass
class Entry:
    """One pending send."""

    id: str
    files: list[str]  # relative to the outbox's root (OUT)
    label: str  # for the log: who sent the source, its SOP Instance UID
    created: float  # when it was first queued (epoch seconds)
    attempts: int = 0
    next_try: float = 0.0
    last_error: str | None = None
    token: str = field(default_factory=lambda: secrets.token_hex(8))  # changes on each put

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Entry:
        return cls(
            id=str(doc["id"]),
            files=[str(f) for f in doc["files"]],
            label=str(doc.get("label", "")),
            created=float(doc["created"]),
            attempts=int(doc.get("attempts", 0)),
            next_try=float(doc.get("next_try", 0.0)),
            last_error=doc.get("last_error"),
            token=str(doc.get("token", "")),
        )


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Outbox:
    """Pending sends under ``root/outbox``; :meth:`start` runs the sender thread."""

    def __init__(
        self,
        root: Path,
        send: SendFn,
        *,
        destination: str,
        base_delay: float = BASE_DELAY,
        max_delay: float = MAX_DELAY,
        status_every: float = STATUS_EVERY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.dir = private_dir(self.root / "outbox")
        self.send, self.destination = send, destination
        self.base_delay, self.max_delay, self.status_every = base_delay, max_delay, status_every
        self.clock = clock
        self.lock = threading.Lock()  # entry files: put vs the sender's update/remove
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.blocked_until = 0.0  # destination unreachable: try nothing before this
        self.thread: threading.Thread | None = None
        self._last_status_log = 0.0
        self._clean_temp_files()

    # -- entries -------------------------------------------------------------------------------
    @staticmethod
    def key(*parts: str) -> str:
        """The entry id of a result set: the same source always maps to the same entry, so a
        resend replaces a pending send instead of queueing a second one."""
        return hashlib.sha256("/".join(parts).encode()).hexdigest()[:32]

    def _path(self, entry_id: str) -> Path:
        return self.dir / f"{entry_id}{SUFFIX}"

    def _write(self, entry: Entry) -> None:
        private_write(self._path(entry.id), (json.dumps(asdict(entry), indent=1) + "\n").encode())

    def _read(self, path: Path) -> Entry | None:
        try:
            return Entry.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # cannot happen through atomic writes; keep it aside for a person, say so once
            bad = path.with_name(path.name + ".bad")
            with contextlib.suppress(OSError):
                os.replace(path, bad)
            log.error("outbox: %s is unreadable (%s); moved to %s", path.name, e, bad.name)
            return None

    def put(self, entry_id: str, files: list[Path], label: str) -> Entry:
        """Queue ``files`` (under the root) durably; due at once. Returns the entry."""
        rel = [str(Path(f).resolve().relative_to(self.root.resolve())) for f in files]
        with self.lock:
            old = self._read(self._path(entry_id)) if self._path(entry_id).exists() else None
            entry = Entry(
                id=entry_id,
                files=rel,
                label=label,
                created=old.created if old else self.clock(),
            )
            self._write(entry)
        self.wake.set()
        return entry

    def pending(self) -> list[Entry]:
        """Every pending entry, oldest first."""
        found = [e for p in self.dir.glob(f"*{SUFFIX}") if (e := self._read(p)) is not None]
        return sorted(found, key=lambda e: (e.created, e.id))

    def pending_files(self) -> set[str]:
        """Root-relative paths some pending entry still has to send."""
        return {f for e in self.pending() for f in e.files}

    def _clean_temp_files(self) -> None:
        """atomic_write's temp files left by a crash (``.NAME.xxxx.tmp``): never an entry."""
        for p in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()

    # -- sending -------------------------------------------------------------------------------
    def run_once(self, *, force: bool = False) -> int:
        """Try every due entry (all of them with ``force``); returns how many were delivered.
        Stops at the first one finding the destination unreachable."""
        now = self.clock()
        if not force and now < self.blocked_until:
            return 0
        delivered = 0
        for entry in self.pending():
            if self.stopping.is_set():
                break
            if not force and entry.next_try > now:
                continue
            paths = [self.root / f for f in entry.files]
            unreachable = False
            try:
                errors = self.send(paths)
            except Unreachable as e:
                errors, unreachable = [str(e)] * len(paths), True
            except Exception as e:  # never let one send end the thread
                errors = [f"{type(e).__name__}: {' '.join(str(e).split())}"] * len(paths)
            left = [f for f, err in zip(entry.files, errors, strict=True) if err]
            first_error = next((err for err in errors if err), None)
            with self.lock:
                current = self._read(self._path(entry.id))
                if current is None or current.token != entry.token:
                    continue  # replaced by a newer put while sending: that one goes next
                if not left:
                    self._path(entry.id).unlink(missing_ok=True)
                    fsync_dir(self.dir)
                    delivered += 1
                    continue
                entry.files = left
                entry.attempts += 1
                entry.last_error = first_error
                entry.next_try = self.clock() + backoff(
                    entry.attempts, base=self.base_delay, cap=self.max_delay
                )
                self._write(entry)
            if unreachable:
                self.blocked_until = entry.next_try
                break
        return delivered

    def status(self) -> dict[str, Any]:
        """What ``status.json`` holds: pending count, oldest entry, next try, last error."""
        entries = self.pending()
        now = self.clock()
        doc: dict[str, Any] = {
            "destination": self.destination,
            "pending": len(entries),
            "updated": _iso(now),
            "oldest_queued": None,
            "oldest_age_s": 0.0,
            "next_try_in_s": None,
            "max_attempts": 0,
            "last_error": None,
        }
        if entries:
            oldest = entries[0]
            failed = [e for e in entries if e.last_error]
            doc.update(
                oldest_queued=_iso(oldest.created),
                oldest_age_s=round(max(0.0, now - oldest.created), 1),
                next_try_in_s=round(
                    max(0.0, max(min(e.next_try for e in entries), self.blocked_until) - now), 1
                ),
                max_attempts=max(e.attempts for e in entries),
                last_error=max(failed, key=lambda e: e.next_try).last_error if failed else None,
            )
        return doc

    @staticmethod
    def describe(doc: dict[str, Any]) -> str:
        """One line of a status document."""
        if not doc["pending"]:
            return f"outbox: empty, everything delivered to {doc['destination']}"
        line = (
            f"outbox: {doc['pending']} pending for {doc['destination']}, oldest "
            f"{_duration(doc['oldest_age_s'])}"
        )
        if doc["last_error"]:
            line += (
                f"; next try in {_duration(doc['next_try_in_s'] or 0)}; "
                f"last error: {doc['last_error']}"
            )
        return line

    def write_status(self) -> dict[str, Any]:
        doc = self.status()
        private_write(self.dir / STATUS, (json.dumps(doc, indent=2) + "\n").encode())
        return doc

    def _loop(self) -> None:
        force = True  # what an earlier run left is due at once
        was_pending = False
        while not self.stopping.is_set():
            try:
                self.run_once(force=force)
                force = False
                doc = self.write_status()
                now = self.clock()
                if doc["pending"] and now - self._last_status_log >= self.status_every:
                    log.warning("%s", self.describe(doc))
                    self._last_status_log = now
                elif not doc["pending"] and was_pending:
                    log.info("%s", self.describe(doc))
                    self._last_status_log = 0.0
                was_pending = bool(doc["pending"])
                wait = self._next_wait(now)
            except Exception as e:  # a full disk, say: say so, keep going
                log.error("outbox: %s: %s", type(e).__name__, " ".join(str(e).split()))
                wait = TICK
            self.wake.wait(wait)
            self.wake.clear()

    def _next_wait(self, now: float) -> float:
        due = [e.next_try for e in self.pending()]
        if not due:
            return TICK
        soonest = max(min(due), self.blocked_until)
        return min(TICK, max(0.05, soonest - now))

    def start(self) -> None:
        """Start the sender thread (pending entries of an earlier run first)."""
        self.thread = threading.Thread(target=self._loop, name="fedbridge-outbox", daemon=True)
        self.thread.start()

    def close(self, timeout: float) -> None:
        """Stop the sender (an ongoing send finishes within ``timeout``); pending entries stay
        on disk for the next start."""
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout)
