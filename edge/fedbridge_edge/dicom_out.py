"""Results back into PACS: a Secondary Capture of the overlay and a Comprehensive SR per image.

Both objects join the input's study (patient and study identifiers copied) in new series of
their own, are made with highdicom and written as DICOM files (``enforce_file_format``). Out of
distribution the report carries no finding and no probabilities, only "not assessed: out of
distribution" and the reason, as the per-image JSON does. No torch here.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fedbridge_edge.errors import EdgeError
from fedbridge_shared import __version__
from fedbridge_shared.files import atomic_write

MANUFACTURER = "fedbridge"
SC_DESCRIPTION = "fedbridge overlay — research use only"
SR_DESCRIPTION = "fedbridge report — research use only"
SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
NOT_ASSESSED = "not assessed: out of distribution"
CHARSET = "ISO_IR 192"  # UTF-8: the series descriptions carry an em dash, names may be anything
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
COPIED = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
    "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName",
)  # fmt: skip

# Codes: DCM and LOINC where one exists, else the local scheme 99FEDBRIDGE (PS3.16 8.2).
LOCAL = "99FEDBRIDGE"
REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
SOURCE = hd.sr.CodedConcept("121112", "DCM", "Source of Measurement")
ALGORITHM_NAME = hd.sr.CodedConcept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = hd.sr.CodedConcept("111003", "DCM", "Algorithm Version")
STATUS = hd.sr.CodedConcept("STATUS", LOCAL, "Assessment status")
REASON = hd.sr.CodedConcept("REASON", LOCAL, "Reason not assessed")
OOD = hd.sr.CodedConcept("OOD", LOCAL, "Out of distribution")
OOD_SCORE = hd.sr.CodedConcept("OODSCORE", LOCAL, "Out-of-distribution score")
OOD_THRESHOLD = hd.sr.CodedConcept("OODTHRESH", LOCAL, "Out-of-distribution threshold")
MODEL_SHA = hd.sr.CodedConcept("MODELSHA", LOCAL, "Model SHA-256")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


@dataclass(frozen=True)
class Outcome:
    """What a prediction says, read through ``to_json`` (old and new ``Prediction`` alike)."""

    status: str
    label: str | None
    probabilities: dict[str, float]
    reason: str | None
    ood_score: float
    ood_threshold: float
    model_sha256: str

    @property
    def ood(self) -> bool:
        return self.status != "ok"

    @classmethod
    def of(cls, pred: Any) -> Outcome:
        record = pred.to_json()
        ood = bool(record.get("ood", getattr(pred, "ood", False)))
        status = record.get("status") or ("out_of_distribution" if ood else "ok")
        if ood:
            status = status if status != "ok" else "out_of_distribution"
        return cls(
            status=status,
            label=None if ood else record.get("label"),
            probabilities={} if ood else dict(record.get("probabilities") or {}),
            reason=record.get("reason") if ood else None,
            ood_score=float(record["ood_score"]),
            ood_threshold=float(record["ood_threshold"]),
            model_sha256=str(record["model_sha256"]),
        )

    def summary(self) -> str:
        """One line: the label and its probability, or why there is none."""
        if self.ood:
            return f"{NOT_ASSESSED}" + (f" ({self.reason})" if self.reason else "")
        p = self.probabilities.get(self.label or "", float("nan"))
        return f"{self.label} {p:.3f}"


def check_source(source: Dataset, *, name: str) -> None:
    """Refuse an input whose UIDs cannot anchor derived objects (missing or not UIDs)."""
    for key in REQUIRED_UIDS:
        value = str(source.get(key, "") or "")
        if not value:
            raise EdgeError(f"{name}: DICOM without {key}; cannot write results into its study")
        if len(value) > 64 or not UID_PATTERN.match(value):
            raise EdgeError(f"{name}: DICOM {key} {value[:70]!r} is not a valid UID")


def read_header(path: Path) -> Dataset:
    """The DICOM header (no pixels) of an input file, for :func:`build`."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:  # pydicom raises many types on broken files
        raise EdgeError(f"{path}: not a readable DICOM header ({' '.join(str(e).split())})") from e


def _copied(source: Dataset) -> dict[str, Any]:
    """Patient and study attributes of the source, as highdicom keyword arguments."""
    values = {k: source.get(k) for k in COPIED}
    sex = str(values["PatientSex"] or "").upper()
    return {
        "study_instance_uid": str(source.StudyInstanceUID),
        "patient_id": str(values["PatientID"] or ""),
        "patient_name": values["PatientName"] or None,
        "patient_birth_date": str(values["PatientBirthDate"] or "") or None,
        "patient_sex": sex if sex in ("M", "F", "O") else None,
        "accession_number": str(values["AccessionNumber"] or ""),
        "study_id": str(values["StudyID"] or ""),
        "study_date": str(values["StudyDate"] or "") or None,
        "study_time": str(values["StudyTime"] or "") or None,
        "referring_physician_name": values["ReferringPhysicianName"] or None,
    }


def _equipment(model_name: str) -> dict[str, Any]:
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": model_name[:64],
        "software_versions": f"fedbridge {__version__}",
        "specific_character_set": CHARSET,
    }


def secondary_capture(
    pred: Any, source: Dataset, *, model_name: str, series_uid: str | None = None
) -> hd.sc.SCImage:
    """The overlay PNG as an RGB Secondary Capture in a new series of the source's study."""
    outcome = Outcome.of(pred)
    with Image.open(io.BytesIO(pred.overlay_png())) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    copied = _copied(source)
    sc = hd.sc.SCImage(
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        # The overlay adds bands and a colour bar around the image: its axes are not the
        # patient's. highdicom wants an orientation for PATIENT; it is emptied below (Type 2).
        patient_orientation=("L", "F"),
        series_instance_uid=series_uid or generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        series_description=SC_DESCRIPTION,
        **copied,
        **_equipment(model_name),
    )
    sc.PatientOrientation = ""
    sc.BurnedInAnnotation = "YES"  # the verdict, model and sha are drawn into the pixels
    sc.ImageComments = (
        f"fedbridge overlay, research use only: {outcome.summary()}; "
        f"model sha256 {outcome.model_sha256}"
    )[:10240]
    sc.DerivationDescription = "fedbridge class activation map over the source image"
    sc.SourceImageSequence = [_reference(source)]
    return sc


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def _evidence(source: Dataset) -> Dataset:
    """The source's identifying attributes, with empty Type 2 ones where it lacks them."""
    evidence = Dataset()
    for key in (*REQUIRED_UIDS, *COPIED, "SpecificCharacterSet"):
        if key in source:
            evidence[key] = source[key]
        elif key in COPIED:
            setattr(evidence, key, "")
    if str(evidence.PatientSex).upper() not in ("M", "F", "O"):
        evidence.PatientSex = ""
    return evidence


def _content(outcome: Outcome, source: Dataset, *, model_name: str) -> hd.sr.ContainerContentItem:
    """The report's tree: status, finding and probabilities (or the reason), OOD, model."""
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(
            STATUS, NOT_ASSESSED if outcome.ood else "assessed", relationship_type=CONTAINS
        )
    ]
    if outcome.ood:
        items.append(
            hd.sr.TextContentItem(
                REASON, outcome.reason or "out of distribution", relationship_type=CONTAINS
            )
        )
    else:
        items.append(hd.sr.TextContentItem(FINDING, str(outcome.label), relationship_type=CONTAINS))
        for i, (label, p) in enumerate(outcome.probabilities.items()):
            name = hd.sr.CodedConcept(f"P{i}", LOCAL, f"Probability of {label}"[:64])
            items.append(hd.sr.NumContentItem(name, float(p), NO_UNITS, relationship_type=CONTAINS))
    items += [
        hd.sr.TextContentItem(OOD, "yes" if outcome.ood else "no", relationship_type=CONTAINS),
        hd.sr.NumContentItem(OOD_SCORE, outcome.ood_score, NO_UNITS, relationship_type=CONTAINS),
        hd.sr.NumContentItem(
            OOD_THRESHOLD, outcome.ood_threshold, NO_UNITS, relationship_type=CONTAINS
        ),
        hd.sr.TextContentItem(ALGORITHM_NAME, model_name, relationship_type=CONTAINS),
        hd.sr.TextContentItem(
            ALGORITHM_VERSION, f"fedbridge {__version__}", relationship_type=CONTAINS
        ),
        hd.sr.TextContentItem(MODEL_SHA, outcome.model_sha256, relationship_type=CONTAINS),
        hd.sr.ImageContentItem(
            SOURCE,
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            relationship_type=CONTAINS,
        ),
    ]
    root = hd.sr.ContainerContentItem(REPORT, is_content_continuous=False)
    root.ContentSequence = items
    return root


def structured_report(
    pred: Any, source: Dataset, *, model_name: str, series_uid: str | None = None
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR of the result in a new series of the source's study."""
    outcome = Outcome.of(pred)
    sr = hd.sr.ComprehensiveSR(
        evidence=[_evidence(source)],
        content=_content(outcome, source, model_name=model_name),
        series_instance_uid=series_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        is_complete=True,
        series_description=SR_DESCRIPTION,
        coding_schemes=[
            CodingSchemeIdentificationItem(designator=LOCAL, name="fedbridge local codes")
        ],
        **_equipment(model_name),
    )
    return sr


def build(pred: Any, source: Dataset, *, model_name: str, name: str) -> tuple[Dataset, Dataset]:
    """(Secondary Capture, SR) for one prediction; EdgeError naming ``name`` if impossible."""
    check_source(source, name=name)
    try:
        return (
            secondary_capture(pred, source, model_name=model_name),
            structured_report(pred, source, model_name=model_name),
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise EdgeError(f"{name}: cannot make DICOM results ({' '.join(str(e).split())})") from e


def encode(ds: Dataset) -> bytes:
    """A dataset as DICOM file bytes (preamble, file meta; checked by pydicom)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(sc: Dataset, sr: Dataset, out: Path, stem: str) -> tuple[Path, Path]:
    """``stem.sc.dcm`` and ``stem.sr.dcm`` in ``out``, each written atomically."""
    sc_bytes, sr_bytes = encode(sc), encode(sr)  # both encoded before either is written
    return (
        atomic_write(Path(out) / f"{stem}.sc.dcm", sc_bytes),
        atomic_write(Path(out) / f"{stem}.sr.dcm", sr_bytes),
    )


def report_values(sr: Dataset) -> dict[str, Any]:
    """Concept meaning → value of an SR's top-level items (text, number, or a referenced UID)."""
    found: dict[str, Any] = {}
    for item in sr.ContentSequence:
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "TEXT":
            found[meaning] = str(item.TextValue)
        elif item.ValueType == "NUM":
            found[meaning] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "IMAGE":
            found[meaning] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return found
