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


class Tracking(StrEnum):
    """Experiment tracking backends (``fedbridge[tracking]``)."""

    none = "none"
    mlflow = "mlflow"


TrackingOpt = Annotated[
    Tracking,
    typer.Option(
        "--tracking",
        help="Log the config, metrics and report files to MLflow (needs fedbridge[tracking]).",
    ),
]
TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI, e.g. a hospital server (default: a local mlruns folder "
        "beside --out).",
    ),
]


def check_tracking(tracking: Tracking) -> None:
    """Before any work: the tracking extra is installed when tracking is asked for."""
    if tracking is Tracking.mlflow:
        from fedbridge_shared.tracking import require

        require()


def track(
    tracking: Tracking,
    uri: str | None,
    bundle: Path,
    *,
    console: Console,
    extra_files: tuple[Path, ...] = (),
) -> None:
    """Log a finished bundle to the tracking backend (nothing when tracking is off)."""
    if tracking is Tracking.none:
        return
    from fedbridge_shared.tracking import default_uri, log_bundle

    where = uri or default_uri(bundle)
    run_id = log_bundle(bundle, uri=where, extra_files=extra_files)
    console.print(f"tracked in MLflow {shown(where)} (run {run_id})")
