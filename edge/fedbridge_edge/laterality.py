"""Laterality markers from the image itself: DICOM PatientOrientation, never assumed.

PatientOrientation (0020,0020) gives the patient direction of the image's rows (left → right
on screen) and of its columns (top → bottom): a PA chest film hung in the usual way is
``L\\F`` — the rows run toward the patient's left, so the screen's left edge is the patient's
right ("R") and its right edge the patient's left ("L"). A film stored mirrored is ``R\\F`` and
gets mirrored markers. PNG/JPEG files and a DICOM without the attribute get no markers.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedbridge_edge.record import Markers

OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "H": "F", "F": "H"}
NOT_DICOM = "none: PNG/JPEG images carry no patient orientation"
NO_ATTRIBUTE = "none: the DICOM has no PatientOrientation"


def markers_from_orientation(value: Sequence[str] | str | None) -> tuple[Markers | None, str]:
    """(markers, where they came from) for a PatientOrientation value (``"L\\F"`` or a list)."""
    if value is None or value == "":
        return None, NO_ATTRIBUTE
    parts = value.split("\\") if isinstance(value, str) else [str(v) for v in value]
    row = parts[0].strip().upper() if parts else ""
    shown = "\\".join(str(p) for p in parts)
    if not row or row[0] not in OPPOSITE or any(c not in OPPOSITE for c in row):
        return None, f"none: PatientOrientation {shown[:32]!r} is not a patient direction"
    toward = row[0]  # an oblique row direction ("LP") is marked by its main component
    return Markers(left=OPPOSITE[toward], right=toward), f"DICOM PatientOrientation {shown}"


def markers_from_dataset(ds: object | None) -> tuple[Markers | None, str]:
    """Markers of a DICOM dataset (None: not a DICOM input)."""
    if ds is None:
        return None, NOT_DICOM
    return markers_from_orientation(getattr(ds, "PatientOrientation", None) or None)
