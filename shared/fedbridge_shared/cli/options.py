"""Option types shared by several commands, so each flag is declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Manifest = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional on py3.10
    typer.Option(help="CSV with path,label,patient_id (default: MANIFEST.csv or split.csv "
                 "in DATA or its parent)."),
]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
Seed = Annotated[int, typer.Option(help="Random seed (splits, initialisation, augmentation).")]
