"""Start Flower's long-running processes and stop them, children included.

Flower's SuperLink and SuperNode spawn ``flower-superexec`` children, some in their own session
(found through their ``--parent-pid`` argument). Each process we start gets its own process
group, and :func:`stop` ends the group plus every descendant psutil finds — only processes this
program started, by PID (psutil checks a PID's start time before it signals it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import psutil

from fedbridge_shared.polling import wait_until


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
    """Processes in process group ``pgid``, e.g. nginx workers whose master died: they keep
    the group but not a command line that names anything."""
    found = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError):
            if os.getpgid(proc.pid) == pgid:
                found.add(proc.pid)
    return found


def owned_by(marker: str) -> set[int]:
    """Processes whose command line contains ``marker`` (e.g. one state folder's path), with
    their descendants; this process and its ancestors are never included."""
    me = psutil.Process()
    mine = {me.pid} | {p.pid for p in me.parents()}
    roots = {p for p, (_, cmd) in process_table().items() if marker in cmd and p not in mine}
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
    """pid → (parent pid, command line) for every visible process."""
    return {pid: (ppid, " ".join(argv)) for pid, (ppid, argv) in _table().items()}


def _table() -> dict[int, tuple[int, list[str]]]:
    table = {}
    for proc in psutil.process_iter(["ppid", "cmdline"]):
        table[proc.pid] = (proc.info["ppid"] or 0, proc.info["cmdline"] or [])
    return table


def _parent_pid_arg(argv: list[str]) -> int | None:
    """The PID a Flower ``flower-superexec`` names with ``--parent-pid``, if any."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--parent-pid" and value.isdigit():
            return int(value)
    return None


def descendants(pids: Iterable[int]) -> set[int]:
    """``pids``, their descendants, and processes naming one of them as ``--parent-pid``."""
    return set(_tree(pids))


def _tree(pids: Iterable[int]) -> dict[int, psutil.Process | None]:
    """:func:`descendants` as pid → psutil.Process (None for a PID already gone): the Process
    remembers its start time, so a PID reused since is never signalled."""
    found: dict[int, psutil.Process | None] = {pid: _process(pid) for pid in pids}
    while True:
        more: dict[int, psutil.Process | None] = {}
        for proc in [p for p in found.values() if p is not None]:
            with contextlib.suppress(psutil.Error):
                more.update({c.pid: c for c in proc.children(recursive=True)})
        for pid, (_, argv) in _table().items():
            if _parent_pid_arg(argv) in found:
                more.setdefault(pid, _process(pid))
        more = {pid: p for pid, p in more.items() if pid not in found}
        if not more:
            return found
        found.update(more)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def alive(pid: int) -> bool:
    """Is ``pid`` running (zombies count as gone)?"""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def stop(procs: Iterable[subprocess.Popen[Any]], timeout: float = 15.0) -> None:
    """SIGTERM each process group and every descendant; SIGKILL what is left after ``timeout``."""
    procs = list(procs)
    tree = _tree(p.pid for p in procs)
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
    _end([proc for proc in tree.values() if proc is not None], timeout)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


def stop_pids(pids: Iterable[int], timeout: float = 15.0) -> None:
    """SIGTERM ``pids``, wait up to ``timeout`` s, then SIGKILL the ones still running."""
    _end([proc for proc in map(_process, set(pids)) if proc is not None], timeout)


def _end(procs: list[psutil.Process], timeout: float) -> None:
    """SIGTERM, wait, SIGKILL, through psutil: a PID reused since ``procs`` were found is left
    alone. Not ``psutil.wait_procs``: it reaps our own children (their ``Popen`` would lose the
    exit status) and counts a zombie as running until its parent reaps it."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    wait_until(lambda: not any(map(_running, procs)), timeout=timeout, interval=0.2)
    for proc in procs:
        if _running(proc):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def wait_for_port(host: str, port: int, proc: subprocess.Popen[Any], timeout: float) -> bool:
    """True once ``host:port`` accepts connections; False if ``proc`` exits or time runs out."""
    import socket

    def state() -> str:
        if proc.poll() is not None:
            return "exited"
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return "open"
        except OSError:
            return ""

    return wait_until(state, timeout=timeout, interval=0.3) == "open"


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
