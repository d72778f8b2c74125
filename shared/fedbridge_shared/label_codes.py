"""Label → coded concept table kept in the edge bundle, for the findings of DICOM SRs.

A model's class labels are free text (``COVID19``, ``CNV``); a PACS or an AI-results viewer
wants a code. SNOMED CT (``SCT``) codes are used where one could be verified for the label;
the rest use the local coding scheme :data:`LOCAL_SCHEME` with the label itself as value (the
SR declares that scheme). ``normal`` marks the class meaning "no finding". Stdlib only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedbridge_shared.errors import BundleError

LOCAL_SCHEME = "99FEDBRIDGE"
SCHEMES = ("SCT", "DCM", "LN", LOCAL_SCHEME)
MAX_MEANING = 64  # LO
MAX_VALUE = 64  # UC LongCodeValue is longer; keep values readable
VALUE_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class LabelCode:
    """One class label's code: ``(value, scheme, meaning)``; ``normal`` for "no finding"."""

    value: str
    scheme: str
    meaning: str
    normal: bool = False


# SNOMED CT codes checked against published terminology lists; Normal is pydicom's
# codes.SCT.Normal. CNV and DRUSEN have no code verified here: they fall back to LOCAL_SCHEME.
KNOWN: dict[str, LabelCode] = {
    "COVID19": LabelCode("840539006", "SCT", "COVID-19"),
    "BACTERIAL_PNEUMONIA": LabelCode("53084003", "SCT", "Bacterial pneumonia"),
    "VIRAL_PNEUMONIA": LabelCode("75570004", "SCT", "Viral pneumonia"),
    "PNEUMONIA": LabelCode("233604007", "SCT", "Pneumonia"),
    "NORMAL": LabelCode("17621005", "SCT", "Normal", normal=True),
    "DME": LabelCode("312912001", "SCT", "Diabetic macular edema"),
    "CNV": LabelCode("CNV", LOCAL_SCHEME, "Choroidal neovascularization"),
    "DRUSEN": LabelCode("DRUSEN", LOCAL_SCHEME, "Drusen"),
}


def _local(label: str) -> LabelCode:
    meaning = label.replace("_", " ").strip().capitalize() or label
    return LabelCode(label, LOCAL_SCHEME, meaning[:MAX_MEANING])


def default_codes(labels: Sequence[str]) -> dict[str, LabelCode]:
    """The code of each label: the known SNOMED CT one, else the label in the local scheme."""
    return {label: KNOWN.get(label.upper(), _local(label)) for label in labels}


def to_json(codes: Mapping[str, LabelCode]) -> dict[str, dict[str, Any]]:
    """``{label: {"value", "scheme", "meaning", "normal"}}`` for the bundle's edge metadata."""
    return {
        label: {"value": c.value, "scheme": c.scheme, "meaning": c.meaning, "normal": c.normal}
        for label, c in codes.items()
    }


def _check(label: str, c: LabelCode) -> LabelCode:
    where = f"label_codes[{label!r}]"
    if c.scheme not in SCHEMES:
        raise BundleError(f"{where}: coding scheme {c.scheme!r} is not one of {', '.join(SCHEMES)}")
    if not c.value or len(c.value) > MAX_VALUE or not VALUE_PATTERN.match(c.value):
        raise BundleError(
            f"{where}: code value {c.value!r} must be 1-{MAX_VALUE} letters, digits, '_', '.', '-'"
        )
    if not c.meaning.strip() or len(c.meaning) > MAX_MEANING or "\\" in c.meaning:
        raise BundleError(
            f"{where}: code meaning {c.meaning!r} must be 1-{MAX_MEANING} characters, no '\\'"
        )
    return c


def from_json(d: Any) -> dict[str, LabelCode]:
    """The table stored by :func:`to_json`; BundleError naming the bad entry otherwise."""
    if not isinstance(d, Mapping) or not d:
        raise BundleError(f"label_codes: expected a non-empty object, got {type(d).__name__}")
    out: dict[str, LabelCode] = {}
    for label, entry in d.items():
        if not isinstance(label, str) or not label:
            raise BundleError(f"label_codes: label {label!r} is not a non-empty string")
        if not isinstance(entry, Mapping):
            raise BundleError(f"label_codes[{label!r}]: expected an object, got {entry!r}")
        missing = [k for k in ("value", "scheme", "meaning") if not isinstance(entry.get(k), str)]
        if missing:
            raise BundleError(f"label_codes[{label!r}]: {', '.join(missing)} missing or not text")
        unknown = set(entry) - {"value", "scheme", "meaning", "normal"}
        if unknown:
            raise BundleError(f"label_codes[{label!r}]: unknown keys {', '.join(sorted(unknown))}")
        normal = entry.get("normal", False)
        if not isinstance(normal, bool):
            raise BundleError(f"label_codes[{label!r}]: normal must be true or false")
        code = LabelCode(entry["value"], entry["scheme"], entry["meaning"], normal)
        out[label] = _check(label, code)
    return out


def from_edge(edge_meta: Mapping[str, Any], labels: Sequence[str]) -> dict[str, LabelCode]:
    """The bundle's table (``edge["label_codes"]``), else :func:`default_codes` of ``labels``.

    A stored table must code every label of the model.
    """
    stored = edge_meta.get("label_codes")
    if stored is None:
        return default_codes(labels)
    codes = from_json(stored)
    missing = [label for label in labels if label not in codes]
    if missing:
        raise BundleError(f"label_codes: no code for the model's labels {', '.join(missing)}")
    return codes
