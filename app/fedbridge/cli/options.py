"""Option types shared by several commands, so each flag is declared once."""

from __future__ import annotations

import functools
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
import typer.core
from rich.console import Console

from fedbridge_shared import defaults

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # the bedside runs Python 3.10 on JetPack 6

    class StrEnum(str, Enum):
        """Python 3.11's StrEnum: members are their values as strings."""

        def __str__(self) -> str:
            return str(self.value)


def _keep_argument_help() -> None:
    """Show positional arguments' help again.

    typer's ``TyperArgument`` stores ``help`` and then calls click's ``Argument.__init__``
    without it; since click 8.5 that ``__init__`` sets ``self.help`` itself (to None), so every
    argument's help vanished from ``--help``. Put it back after the constructor.
    """
    init = typer.core.TyperArgument.__init__
    if getattr(init, "_keeps_help", False):
        return

    @functools.wraps(init)
    def keep_help(self, *args, help: str | None = None, **kwargs) -> None:  # noqa: A002
        init(self, *args, help=help, **kwargs)
        if help and not self.help:
            self.help = help

    keep_help._keeps_help = True  # type: ignore[attr-defined]
    typer.core.TyperArgument.__init__ = keep_help  # type: ignore[method-assign]


_keep_argument_help()


class Augment(StrEnum):
    """Augmentation presets (``fedbridge_shared.defaults.AUGMENT_PRESETS``)."""

    cxr = "cxr"
    oct = "oct"
    none = "none"


# choices named once, in fedbridge_shared.defaults
Strategy = StrEnum("Strategy", {name: name for name in defaults.STRATEGIES})  # type: ignore[misc]
Intensity = StrEnum("Intensity", {name: name for name in defaults.INTENSITIES})  # type: ignore[misc]


AugmentOpt = Annotated[Augment, typer.Option("--augment", help="Augmentation preset.")]
Manifest = Annotated[
    Path | None,
    typer.Option(
        help="CSV with path,label,patient_id (default: MANIFEST.csv or split.csv "
        "in DATA or its parent)."
    ),
]


def _device_name(value: str) -> str:
    """``--device`` checked by its form before any work (whether the GPU exists is checked
    when training starts)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'.")
    return value


Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N", callback=_device_name)]
AllowSharedFiles = Annotated[
    bool,
    typer.Option(
        "--allow-shared-files",
        help="Use a dataset where one file is reached more than once (a class folder linked "
        "to another, a file linked into two classes).",
    ),
]
AllowSimilarLabels = Annotated[
    bool,
    typer.Option(
        "--allow-similar-labels",
        help="Use class folders whose names differ only by whitespace or Unicode form.",
    ),
]
AllowManifestConflict = Annotated[
    bool,
    typer.Option(
        "--allow-manifest-conflict",
        help="Use a manifest whose labels contradict the folders (the folder's label is used).",
    ),
]


def allowed(*, shared_files: bool, similar_labels: bool, manifest_conflict: bool) -> frozenset:
    """The dataset-validation kinds the ``--allow-…`` flags waive."""
    flags = {
        "shared-files": shared_files,
        "similar-labels": similar_labels,
        "manifest-conflict": manifest_conflict,
    }
    return frozenset(kind for kind, on in flags.items() if on)


Seed = Annotated[int, typer.Option(help="Random seed (splits, initialisation, augmentation).")]
TrainLabelMap = Annotated[
    list[str] | None,
    typer.Option(
        "--label-map",
        help="Train on a folder whose class is only known as a set of the model's labels, "
        "e.g. PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA: its films teach "
        "'one of these' (partial-label loss), never one guessed member (repeatable).",
    ),
]


AsJson = Annotated[
    bool,
    typer.Option(
        "--json", help="Print the result as one JSON document on stdout (messages on stderr)."
    ),
]


def print_json(result: object) -> None:
    """``--json``: the one document on stdout; NaN and infinities become null (valid JSON)."""
    import json

    sys.stdout.write(json.dumps(_finite(result), indent=2, default=str) + "\n")
    sys.stdout.flush()


def _finite(obj: object) -> object:
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def ascii_safe_streams() -> None:
    """On a console that cannot encode UTF-8 (``PYTHONIOENCODING=ascii``, a C locale), write
    what it cannot show as ``\\u2014`` escapes instead of crashing on the first em dash."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            "\u2014\u2192".encode(encoding)
        except (UnicodeEncodeError, LookupError):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(errors="backslashreplace")


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
