"""A run's summary: ``predictions.csv`` and ``predictions.jsonl``, one row per input image."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fedbridge_shared.files import atomic_write

CSV, JSONL = "predictions.csv", "predictions.jsonl"
FIELDS = (
    "image", "status", "label", "top_probability", "ood", "ood_score", "ood_threshold",
    "model_sha256", "reason",
)  # fmt: skip


def row(pred: Any, image: Path | str) -> dict[str, Any]:
    """One image's row from its prediction (``to_json``); no label out of distribution."""
    record = pred.to_json()
    ood = bool(record.get("ood"))
    probabilities = record.get("probabilities") or {}
    label = None if ood else record.get("label")
    return {
        "image": str(image),
        "status": record.get("status") or ("out_of_distribution" if ood else "ok"),
        "label": label,
        "top_probability": probabilities.get(label) if label is not None else None,
        "ood": ood,
        "ood_score": record.get("ood_score"),
        "ood_threshold": record.get("ood_threshold"),
        "model_sha256": record.get("model_sha256"),
        "reason": record.get("reason") if ood else None,
    }


def error_row(image: Path | str, reason: str, sha256: str) -> dict[str, Any]:
    """The row of an image that could not be predicted."""
    return {**dict.fromkeys(FIELDS), "image": str(image), "status": "error",
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
