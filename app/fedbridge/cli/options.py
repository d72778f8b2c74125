"""Option types shared by several commands, so each flag is declared once."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
