"""Start Flower's long-running processes and stop them, children included.

Flower's SuperLink and SuperNode spawn ``flower-superexec`` children, some in their own session
(found through their ``--parent-pid`` argument). Each process we start gets its own process
group, and :func:`stop` ends the group plus every descendant found in ``/proc`` — only processes
this program started, by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's tools: this interpreter's ``bin`` first on PATH."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # a SuperNode's superexec looks for new tasks every second by default; a round has two
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def spawn(
    cmd: Sequence[str], log: Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new process group with stdout+stderr appended to ``log``.

    On Linux the child gets SIGTERM when this process dies, even by SIGKILL (the OOM killer, an
    admin's ``kill -9``), so a SuperLink or SuperNode never outlives the command that owns it.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(
            list(cmd),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for Popen: on Linux the child gets SIGTERM when this process dies."""
    return _die_with(os.getpid()) if sys.platform.startswith("linux") else None


def _die_with(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        """In the child, before exec: ask the kernel for SIGTERM when the parent dies."""
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def group_members(pgid: int) -> set[int]:
    """Processes in process group ``pgid`` (Linux /proc), e.g. nginx workers whose master
    died: they keep the group but not a command line that names anything."""
    return {pid for pid, (_, group, _) in _proc_entries().items() if group == pgid}


def owned_by(marker: str) -> set[int]:
    """Processes whose command line contains ``marker`` (e.g. one state folder's path), with
    their descendants; this process and its ancestors are never included."""
    table = process_table()
    mine = {os.getpid()}
    pid = os.getpid()
    while pid in table and table[pid][0] not in mine and table[pid][0] > 0:
        pid = table[pid][0]
        mine.add(pid)
    roots = {p for p, (_, cmd) in table.items() if marker in cmd and p not in mine}
    return descendants(roots) - mine if roots else set()


@contextlib.contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (with our PID in it) for the block; a second holder
    is refused naming the first one's PID. The kernel frees it when we die, however we die."""
    import fcntl

    from fedbridge_shared.errors import ConfigError

    lock.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            other = fh.read().strip() or "?"
            raise ConfigError(
                f"{what} is already running with {lock.parent} (PID {other}); stop it first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def process_table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line) for every visible process (Linux /proc)."""
    return {pid: (ppid, cmd) for pid, (ppid, _, cmd) in _proc_entries().items()}


def _proc_entries() -> dict[int, tuple[int, int, str]]:
    """pid → (parent pid, process group, command line), read once from /proc (Linux)."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self").exists() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            ppid, pgid = int(fields[1]), int(fields[2])
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry.name)] = (ppid, pgid, cmd)
    return table


def descendants(pids: Iterable[int]) -> set[int]:
    """``pids``, their descendants, and processes naming one of them as ``--parent-pid``."""
    table = process_table()
    found = set(pids)
    while True:
        more = {
            pid
            for pid, (ppid, cmd) in table.items()
            if pid not in found
            and (ppid in found or any(f"--parent-pid {p}" in cmd for p in found))
        }
        if not more:
            return found
        found |= more


def alive(pid: int) -> bool:
    """Is ``pid`` running (zombies count as gone)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); treat it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop(procs: Iterable[subprocess.Popen[Any]], timeout: float = 15.0) -> None:
    """SIGTERM each process group and every descendant; SIGKILL what is left after ``timeout``."""
    procs = list(procs)
    targets = descendants(p.pid for p in procs)
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
    stop_pids(targets, timeout)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


def stop_pids(pids: Iterable[int], timeout: float = 15.0) -> None:
    """SIGTERM ``pids``, wait up to ``timeout`` s, then SIGKILL the ones still running."""
    targets = set(pids)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for pid in targets):
        time.sleep(0.2)
    for pid in targets:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def wait_for_port(host: str, port: int, proc: subprocess.Popen[Any], timeout: float) -> bool:
    """True once ``host:port`` accepts connections; False if ``proc`` exits or time runs out."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.3)
    return False


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` so ``finally`` blocks stop our children first."""

    def handler(signum: int, frame: object) -> NoReturn:  # noqa: ARG001
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
