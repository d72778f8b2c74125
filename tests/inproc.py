"""Run ``fedbridge ARGS…`` inside the test process (no 5 s interpreter start per call).

The entry point ``fedbridge.cli.main`` runs as the console script would: its one-line
error handling, its exit code. Output is captured by pytest's ``capsys``; an exception that
escapes ``main`` (a traceback a user would see) is rendered into ``stderr``.
"""

from __future__ import annotations

import subprocess
import sys
import traceback
from unittest import mock

from fedbridge.cli import main


def run(capsys, *args) -> subprocess.CompletedProcess:
    capsys.readouterr()
    argv = ["fedbridge", *map(str, args)]
    code, tb = 0, ""
    with mock.patch.object(sys, "argv", argv):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported as the traceback a user would see
            code, tb = 1, traceback.format_exc()
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err + tb)
