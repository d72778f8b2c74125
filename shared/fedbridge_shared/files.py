"""Atomic writes of files and folders: every writer in fedbridge goes through these two.

No heavy imports, so the bedside runtime uses them too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def atomic_write(
    path: Path, data: bytes | Callable[[IO[bytes]], None], *, mode: int | None = None
) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary handle) to a temp file beside
    ``path``, fsync it, then rename it onto ``path``: readers see the old file or the new one.

    ``mode`` sets the permissions (e.g. 0o600 for a private key); by default an existing file's
    mode is kept, else 0o644.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; keep an existing file's mode, else the usual 0644.
        if mode is None:
            mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
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
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp sibling folder of ``out`` to fill; it becomes ``out`` on success and is
    removed on error, so nothing is ever half-written.

    Without ``replace``, ``out`` must be absent or an empty folder (callers check and say so).
    With ``replace`` an existing ``out`` is swapped: moved aside, the new folder renamed in, the
    old one removed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()  # not mkdtemp: its 0o700 mode would stick to the final folder
    try:
        yield tmp
        if replace and out.exists():
            old = out.parent / f".{out.name}.old-{secrets.token_hex(6)}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
