"""Option types shared by several commands, so each flag is declared once."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # the bedside runs Python 3.10 on JetPack 6

    class StrEnum(str, Enum):
        """Python 3.11's StrEnum: members are their values as strings."""

        def __str__(self) -> str:
            return str(self.value)


Manifest = Annotated[
    Path | None,
    typer.Option(
        help="CSV with path,label,patient_id (default: MANIFEST.csv or split.csv "
        "in DATA or its parent)."
    ),
]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
Seed = Annotated[int, typer.Option(help="Random seed (splits, initialisation, augmentation).")]


def make_console(stderr: bool = False) -> Console:
    """A rich console; 120 columns when not a terminal so tables in logs are not cut."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 120)


def shown(text: object) -> str:
    """Text from outside (file names, labels, messages) safe to print: rich markup escaped and
    control characters (a newline in a file name) written as escapes, so it stays one line."""
    from rich.markup import escape

    raw = str(text)
    safe = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in raw)
    return escape(safe)
