"""A run's summary: ``predictions.csv`` and ``predictions.jsonl``, one row per input image.

Each row is read off the image's :class:`~fedbridge_edge.record.PredictionRecord`; an image
that could not be predicted gets a row with status ``error`` and the reason.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fedbridge_edge.record import PredictionRecord
from fedbridge_shared.files import atomic_write

CSV, JSONL = "predictions.csv", "predictions.jsonl"
ERROR = "error"
FIELDS = (
    "image", "status", "label", "top_score", "score_kind", "ood_score", "ood_threshold",
    "markers", "model_sha256", "reason",
)  # fmt: skip


def row(record: PredictionRecord, image: Path | str) -> dict[str, Any]:
    """One image's row; no label out of distribution (the record has none)."""
    markers = record.markers
    return {
        "image": str(image),
        "status": record.status.value,
        "label": record.label,
        "top_score": record.top_score,
        "score_kind": record.score_kind.value,
        "ood_score": record.ood_score,
        "ood_threshold": record.ood_threshold,
        "markers": None if markers is None else f"{markers.left}|{markers.right}",
        "model_sha256": record.model.sha256,
        "reason": record.reason,
    }


def error_row(image: Path | str, reason: str, sha256: str) -> dict[str, Any]:
    """The row of an image that could not be predicted."""
    return {**dict.fromkeys(FIELDS), "image": str(image), "status": ERROR,
            "model_sha256": sha256, "reason": reason}  # fmt: skip


def write(rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """``out/predictions.csv`` and ``out/predictions.jsonl``, each written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in FIELDS})
    lines = "".join(json.dumps({k: r[k] for k in FIELDS}, allow_nan=False) + "\n" for r in rows)
    return (
        atomic_write(Path(out) / CSV, text.getvalue().encode()),
        atomic_write(Path(out) / JSONL, lines.encode()),
    )
