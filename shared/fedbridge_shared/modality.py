"""Which imaging modality a model reads, told by its label names."""

from __future__ import annotations

from collections.abc import Sequence

MODALITY_LABELS = {
    "cxr": {"COVID19", "BACTERIAL_PNEUMONIA", "VIRAL_PNEUMONIA", "PNEUMONIA"},
    "oct": {"CNV", "DME", "DRUSEN"},
}


def modality_of(labels: Sequence[str]) -> str:
    """ "cxr" / "oct" from the label names, else "unknown"."""
    names = {label.upper() for label in labels}
    found = [m for m, known in MODALITY_LABELS.items() if names & known]
    return found[0] if len(found) == 1 else "unknown"
