"""Run the real ``fedbridge`` command in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fedbridge_shared.polling import wait_until


def fedbridge(
    *args: str | Path,
    cwd: Path | None = None,
    timeout: int = 600,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
    umask: int = -1,
):
    """Run ``fedbridge ARGS…`` (after ``prefix``, e.g. ``ip netns exec NS``); returns the
    CompletedProcess (text output). ``env`` adds variables; ``umask`` (≥ 0) sets the child's."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "fedbridge", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
        umask=umask,
    )


def ok(*args: str | Path, **kw):
    result = fedbridge(*args, **kw)
    assert result.returncode == 0, f"fedbridge {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def json_out(*args: str | Path, **kw) -> dict:
    return json.loads(ok(*args, **kw).stdout)


def assert_one_line_error(result, *needles: str) -> str:
    """Exit ≠ 0, no traceback, and one 'error:' line on stderr containing every needle."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def as_foreground() -> None:
    """A ``preexec_fn``: SIGINT as a terminal's foreground command has it (default).

    A test run started as a background job (``cmd &`` in a script, as CI may) ignores SIGINT,
    and its children inherit that, so a test of Ctrl-C would test nothing; this undoes it.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(*args: str | Path, log: Path, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """Start ``fedbridge ARGS…`` in the background, in its own session, output appended to ``log``.

    ``prefix`` (e.g. ``ip netns exec NS``, which execs) keeps the PID the fedbridge process's.

    Stop it (and its children) with :func:`fedbridge_shared.processes.stop`.
    """
    fh = open(log, "a")  # noqa: SIM115 - the child keeps its own copy of the descriptor
    try:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "fedbridge", *map(str, args)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=as_foreground,
        )
    finally:
        fh.close()


def wait_for(condition, what: str, *, deadline: float):
    """``condition()``'s first truthy value, polled every 0.2 s for at most ``deadline`` s."""
    value = wait_until(condition, timeout=deadline, interval=0.2)
    if not value:
        raise AssertionError(f"gave up waiting for {what}")
    return value
