"""Which imaging modality a model reads: a sealed field of its spec, never guessed from labels."""

from __future__ import annotations

MODALITIES = ("cxr", "oct", "other")
"""``cxr``: chest radiographs (never flipped; laterality matters); ``oct``: retinal OCT B-scans;
``other``: anything else (no modality-specific behaviour)."""


def modality_for_stage(*, requested: str | None, inherited: str, augment: str) -> str:
    """A stage's modality: ``--modality`` if given, else the init bundle's, else the
    augmentation preset's when it names one (``cxr`` / ``oct``), else ``other``. ``augment`` is
    "" when no preset was asked for: the default preset (cxr) then makes a cxr model, as before
    the modality was sealed."""
    if requested is not None:
        return requested
    if inherited != "other":
        return inherited
    if augment == "":
        return "cxr"
    return augment if augment in MODALITIES else "other"


def augment_for(modality: str, default: str) -> str:
    """The augmentation preset of a model's modality (``cxr`` / ``oct``), else ``default``."""
    return modality if modality in ("cxr", "oct") else default
