"""Atomic writes of files and folders: every writer in fedbridge goes through these two.

No heavy imports, so the bedside runtime uses them too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

from fedbridge_shared.errors import ConfigError, FedbridgeError
from fedbridge_shared.processes import alive


def atomic_write(
    path: Path, data: bytes | Callable[[IO[bytes]], object], *, mode: int | None = None
) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary handle) to a temp file beside
    ``path``, fsync it, then rename it onto ``path``: readers see the old file or the new one.

    ``mode`` sets the permissions (e.g. 0o600 for a private key); by default an existing file's
    mode is kept, else the process umask's (0o644 under umask 022, 0o640 under 027), as for
    any file a program creates, so a service user of the group can read a bundle.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; keep an existing file's mode, else the umask's.
        if mode is None:
            mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~current_umask()
        os.chmod(tmp_name, mode)
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with signals_held():
            Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; elsewhere
    set and restored at once)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(out: Path, *, option: str = "--out") -> None:
    """Fail before long work when ``out`` cannot be written (its parent is a file, read-only,
    full): OSError naming the path, which the CLI prints as one line."""
    out = Path(out)
    parent = out.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(20, f"{option}: {p} is a file, not a folder", str(p))
            break
    parent.mkdir(parents=True, exist_ok=True)
    probe = parent / f".{out.name}.probe-{secrets.token_hex(4)}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 65536)  # a full disk fails here, not after training
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(out)) from e
    finally:
        probe.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp sibling folder of ``out`` to fill; it becomes ``out`` on success and is
    removed on error, so nothing is ever half-written.

    Without ``replace``, ``out`` must be absent or an empty folder (callers check and say so).
    With ``replace`` an existing ``out`` is swapped: moved aside to ``.NAME.old``, the new folder
    renamed in, then every entry of the old folder the new one does not have (a report, the
    user's notes) moved back; only what the new folder replaces is deleted. A crash at any
    point is repaired by the next call (see :func:`recover_dir`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out)
    remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}"
    tmp.mkdir()  # not mkdtemp: its 0o700 mode would stick to the final folder
    try:
        yield tmp
        _fsync_tree(tmp)
        if replace and out.exists():
            old = _old(out)
            os.replace(out, old)
            os.replace(tmp, out)
            recover_dir(out)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        with signals_held():  # a second Ctrl-C or SIGTERM must not stop the cleanup halfway
            shutil.rmtree(tmp, ignore_errors=True)
        raise


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends (cleanup that must finish)."""
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    except (AttributeError, OSError, ValueError):  # no pthread_sigmask here
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_signals_raise() -> None:
    """Make SIGTERM and SIGHUP raise ``SystemExit(128 + signum)`` in the main thread, as
    SIGINT raises KeyboardInterrupt, so every ``atomic_dir`` / ``atomic_write`` removes its
    temp files when a long command is stopped (the CLI calls this once at start)."""

    def handler(signum: int, frame: object) -> NoReturn:  # noqa: ARG001
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            return


def remove_stale_temps(out: Path) -> None:
    """Remove ``atomic_dir`` temp folders of ``out`` left by a process that no longer runs
    (one killed by SIGKILL or a power cut); only fedbridge's own ``.NAME.tmp-PID-…`` names."""
    prefix = f".{Path(out).name}.tmp-"
    try:
        entries = list(Path(out).parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _old(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def recover_dir(out: Path) -> None:
    """Finish an interrupted swap of ``out``: bring the old folder back if the new one never
    arrived, else move the old folder's other entries into the new one and drop the rest."""
    old = _old(out)
    if not old.is_dir():
        return
    if not out.exists():
        os.replace(old, out)
        return
    for entry in old.iterdir():
        if not (out / entry.name).exists() and not os.path.lexists(out / entry.name):
            os.replace(entry, out / entry.name)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def strict_json(obj: Any, *, where: str, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN and infinities (which are not JSON), naming the first
    such value's place: ``where: training.history[1].train_loss is nan``."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        place = _non_finite(obj, "") or "a value"
        raise FedbridgeError(
            f"{where}: {place}, not a finite number; refusing to write invalid JSON"
        ) from None


def _non_finite(obj: Any, path: str) -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{path or 'the value'} is {obj}"
    if isinstance(obj, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for sub, value in items:
        found = _non_finite(value, sub)
        if found:
            return found
    return None


def read_json_object(path: Path, *, what: str = "JSON") -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when there is no such file.

    A file that is unreadable, not JSON or not an object is a one-line ``ConfigError`` naming
    ``path`` and ``what`` it was meant to hold.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable {what} ({e})") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: {what} must be an object")
    return doc


MAX_MODEL_BYTES = 2 << 30  # protobuf's own limit; FEDBRIDGE_MAX_MODEL_BYTES overrides it


def max_model_bytes() -> int:
    """The largest model file read (weights, ONNX): ``FEDBRIDGE_MAX_MODEL_BYTES`` or 2 GiB."""
    text = os.environ.get("FEDBRIDGE_MAX_MODEL_BYTES", "").strip()
    if not text:
        return MAX_MODEL_BYTES
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"FEDBRIDGE_MAX_MODEL_BYTES={text!r}: must be a positive whole number")
    return int(text)


def read_regular(path: Path, *, limit: int, option: str = "FEDBRIDGE_MAX_MODEL_BYTES") -> bytes:
    """The bytes of ``path`` when it is a regular file of at most ``limit`` bytes, checked before
    anything is read: a FIFO (which would block), a device such as /dev/zero (which never ends)
    or an oversized file is an OSError naming the path, with nothing read."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once, unread
    try:
        st = os.fstat(fd)  # the file opened, not a name that could be swapped after a check
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or folder)", str(path))
        if st.st_size > limit:
            raise OSError(
                errno.EFBIG,
                f"{st.st_size:,} bytes, over the {limit:,} bytes limit ({option})",
                str(path),
            )
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"grew over the {limit:,} bytes limit while read", str(path))
        return data
    finally:
        os.close(fd)
