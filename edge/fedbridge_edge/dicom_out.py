"""Results back into PACS: a Secondary Capture of the overlay and a TID 1500 SR per image.

Both objects join the input's study (patient and study identifiers copied) in one AI series
per study, model and kind (overlay or report). Their UIDs are derived from the source's UIDs
and the model's seal, so resending an image gives the same objects again (a PACS replaces them
instead of keeping duplicates). The report is an Imaging Measurement Report (TID 1500, made
with highdicom): a device observer, the algorithm (TID 4019: name and seal), the procedure,
the finding as a coded qualitative evaluation (the bundle's label code table), the top score to
3 decimals (called a probability only when the model is calibrated) and the research-use-only
notice. Out of distribution the report carries no finding and no score, only "not assessed"
and the reason, as the per-image JSON does. No torch here.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import generate_uid

from fedbridge_edge.errors import EdgeError
from fedbridge_edge.record import PredictionRecord, ScoreKind
from fedbridge_shared.files import atomic_write
from fedbridge_shared.label_codes import LOCAL_SCHEME, LabelCode

MANUFACTURER = "fedbridge"
SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
SC_MAX_SIDE = 2048
"""The Secondary Capture keeps the source's resolution up to this long side."""
RESEARCH_USE = "research use only — not for diagnostic use"
NOT_ASSESSED = "not assessed: out of distribution"
CHARSET = "ISO_IR 192"  # UTF-8: the notice carries an em dash, names may be anything
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
COPIED = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
    "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName",
)  # fmt: skip
LATERALITIES = ("R", "L")  # Laterality's enumerated values
IMAGE_LATERALITIES = ("R", "L", "U", "B")
UNPAIRED = {  # BodyPartExamined values (PS3.16 Annex L) of unpaired parts this tool may see
    "CHEST", "THORAX", "LUNG", "HEART", "ABDOMEN", "PELVIS", "HEAD", "SKULL", "NECK",
    "CSPINE", "TSPINE", "LSPINE", "SPINE", "WHOLEBODY",
}  # fmt: skip

# Concepts: DCM and SCT where they have one, else the local scheme (declared in the SR).
TITLE = dcm_codes.DCM.ImagingMeasurementReport  # (126000, DCM)
FINDING = dcm_codes.DCM.Finding  # (121071, DCM)
PROBABILITY = dcm_codes.DCM.Probability  # (122157, DCM)
SCORE = dcm_codes.SCT.Score  # (246262008, SCT)
COMMENT = dcm_codes.DCM.Comment  # (121106, DCM)
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
PROCEDURES = {
    "cxr": dcm_codes.SCT.ChestImaging,  # (413815006, SCT)
    "oct": dcm_codes.DCM.OphthalmicTomography,  # (OPT, DCM)
}
OTHER_PROCEDURE = dcm_codes.cid100.ImagingProcedure  # (363679005, SCT)
CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=LOCAL_SCHEME, name="fedbridge local codes", responsible_organization="fedbridge"
)


def check_source(source: Dataset, *, name: str) -> None:
    """Refuse an input whose UIDs cannot anchor derived objects (missing or not UIDs)."""
    for key in REQUIRED_UIDS:
        value = str(source.get(key, "") or "")
        if not value:
            raise EdgeError(f"{name}: DICOM without {key}; cannot write results into its study")
        if len(value) > 64 or not UID_PATTERN.match(value):
            raise EdgeError(f"{name}: DICOM {key} {value[:70]!r} is not a valid UID")


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["fedbridge", *parts]))


@dataclass(frozen=True)
class ResultUids:
    """The result object's series and instance UIDs, the same for the same source and model."""

    series: str
    instance: str
    instance_number: int

    @classmethod
    def of(cls, source: Dataset, seal: str, kind: str) -> ResultUids:
        """``kind`` is "sc" or "sr": one series per (study, model, kind)."""
        sop = str(source.SOPInstanceUID)
        digest = hashlib.sha256(sop.encode()).hexdigest()
        return cls(
            series=_uid(str(source.StudyInstanceUID), seal, kind),
            instance=_uid(sop, seal, kind),
            instance_number=1 + int(digest[:12], 16) % 999_999,
        )


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


def _equipment(record: PredictionRecord) -> dict[str, Any]:
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": record.model.name[:64],
        "software_versions": f"fedbridge {record.model.version}"[:64],
        "specific_character_set": CHARSET,
    }


def _dated(ds: Dataset, now: datetime) -> None:
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


BODY_PART_OF_MODALITY = {"cxr": "CHEST"}
"""The body part a model of this (sealed) modality reads, for a source that does not say."""


def _set_laterality(sc: Dataset, source: Dataset, body_part: str) -> None:
    """Laterality (Type 2C) and ImageLaterality as the source says; empty when it cannot tell.

    The source's ImageLaterality (R, L, U or B) is kept. Laterality is absent for an unpaired
    BodyPartExamined (CHEST: it must be absent then); else it is the source's Laterality, or
    its ImageLaterality when R or L; absent when ImageLaterality is U or B (that attribute
    then answers); else empty, "unknown".
    """
    laterality = str(source.get("Laterality", "") or "").upper()
    image = str(source.get("ImageLaterality", "") or "").upper()
    if image in IMAGE_LATERALITIES:
        sc.ImageLaterality = image
    if body_part.upper() in UNPAIRED:
        return
    if laterality not in LATERALITIES:
        laterality = image if image in LATERALITIES else ""
    if laterality or not image:
        sc.Laterality = laterality


def _orientation(source: Dataset) -> list[str] | str:
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return ""
    return [str(v) for v in value]


def secondary_capture(record: PredictionRecord, overlay_png: bytes, source: Dataset) -> Dataset:
    """The overlay PNG as an RGB Secondary Capture in the study's overlay series of the model."""
    with Image.open(io.BytesIO(overlay_png)) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    uids = ResultUids.of(source, record.model.sha256, "sc")
    sc = hd.sc.SCImage(
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # replaced below by the source's (or emptied)
        series_instance_uid=uids.series,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.instance,
        instance_number=uids.instance_number,
        series_description=f"fedbridge overlay {record.model.name}"[:64],
        **_copied(source),
        **_equipment(record),
    )
    # The overlay adds bands and a colour bar around the image but keeps its axes.
    sc.PatientOrientation = _orientation(source)  # type: ignore[assignment]  # "" = no value
    body_part = str(source.get("BodyPartExamined", "") or "")
    if not body_part and not source.get("Laterality") and not source.get("ImageLaterality"):
        body_part = BODY_PART_OF_MODALITY.get(record.model.modality, "")
    _set_laterality(sc, source, body_part)
    if body_part:
        sc.BodyPartExamined = body_part
    _dated(sc, datetime.now())
    sc.BurnedInAnnotation = "YES"  # the verdict, model and sha are drawn into the pixels
    sc.ImageComments = (
        f"fedbridge overlay, {RESEARCH_USE}: {record.summary()}; "
        f"model {record.model.name} sha256 {record.model.sha256}"
    )[:10240]
    sc.DerivationDescription = "fedbridge class activation map over the source image"
    sc.SourceImageSequence = [_reference(source)]
    return sc


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


def _library_entry(source: Dataset) -> Dataset:
    """What the image library needs of the source; projection descriptors only when complete."""
    entry = Dataset()
    entry.SOPClassUID, entry.SOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    entry.Rows, entry.Columns = int(source.Rows), int(source.Columns)
    entry.Modality = "OT"
    orientation = _orientation(source)
    if orientation and source.get("ImagerPixelSpacing") and source.get("Modality"):
        entry.Modality = str(source.Modality)
        entry.PatientOrientation = orientation
        entry.ImagerPixelSpacing = source.ImagerPixelSpacing
    return entry


def _library(source: Dataset) -> list[Dataset] | None:
    """The source for the report's image library, or None when highdicom cannot describe it."""
    if "Rows" not in source or "Columns" not in source:
        return None
    entry = _library_entry(source)
    try:
        hd.sr.ImageLibrary([entry])
    except (ValueError, KeyError, AttributeError, TypeError):  # not an image SOP class it knows
        return None
    return [entry]


def _score_item(record: PredictionRecord) -> hd.sr.Measurement | None:
    score = record.top_score
    if score is None:
        return None
    name = PROBABILITY if record.score_kind is ScoreKind.PROBABILITY else SCORE
    measurement = hd.sr.Measurement(name=name, value=round(float(score), 3), unit=NO_UNITS)
    value = measurement[0].MeasuredValueSequence[0]
    value.NumericValue = f"{score:.3f}"  # three decimals, as the JSON summary prints
    if "FloatingPointValue" in value:
        value.FloatingPointValue = round(float(score), 3)
    return measurement


def _group(
    record: PredictionRecord, source: Dataset, codes: dict[str, LabelCode]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    seal = record.model.sha256
    evaluations, measurements = [], []
    if not record.ood:
        label = str(record.label)
        if label not in codes:
            raise ValueError(f"no code for label {label!r} in the model's label code table")
        code = codes[label]
        value = hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
        evaluations.append(hd.sr.QualitativeEvaluation(FINDING, value))
        score = _score_item(record)
        if score is not None:
            measurements.append(score)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid(str(source.SOPInstanceUID), seal, "tracking"),
            identifier=f"fedbridge {record.model.name} result"[:64],
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=f"fedbridge {record.model.name}"[:64],
            version=seal[:64],
            manufacturer=MANUFACTURER,
        ),
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
            )
        ],
    )
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    texts = [RESEARCH_USE]
    if record.ood:
        texts.insert(0, NOT_ASSESSED + (f": {record.reason}" if record.reason else ""))
    group[0].ContentSequence.extend(
        hd.sr.TextContentItem(COMMENT, text, relationship_type=contains) for text in texts
    )
    return group


def _device(record: PredictionRecord) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(record.model.sha256, "device"),
            name=f"fedbridge {record.model.name}"[:64],
            manufacturer_name=MANUFACTURER,
            model_name=record.model.name[:64],
        ),
    )


def _uses_local(record: PredictionRecord, codes: dict[str, LabelCode]) -> bool:
    """Whether the report carries a code of the local scheme (then it declares the scheme)."""
    code = codes.get(record.label) if record.label is not None else None
    return code is not None and code.scheme == LOCAL_SCHEME


def structured_report(
    record: PredictionRecord, source: Dataset, *, codes: dict[str, LabelCode]
) -> Dataset:
    """The result as a TID 1500 Imaging Measurement Report (Comprehensive SR)."""
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device(record)),
        procedure_reported=PROCEDURES.get(record.model.modality, OTHER_PROCEDURE),
        imaging_measurements=[_group(record, source, codes)],
        title=TITLE,
        referenced_images=_library(source),
    )
    uids = ResultUids.of(source, record.model.sha256, "sr")
    sr = hd.sr.ComprehensiveSR(
        evidence=[_evidence(source)],
        content=content,
        series_instance_uid=uids.series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.instance,
        instance_number=uids.instance_number,
        is_complete=True,
        series_description=f"fedbridge AI result {record.model.name}"[:64],
        coding_schemes=[CODING_SCHEME] if _uses_local(record, codes) else None,
        **_equipment(record),
    )
    _dated(sr, datetime.now())
    return sr


def build(
    record: PredictionRecord,
    overlay_png: bytes,
    source: Dataset,
    *,
    codes: dict[str, LabelCode],
    name: str,
) -> tuple[Dataset, Dataset]:
    """(Secondary Capture, SR) for one prediction; EdgeError naming ``name`` if impossible."""
    check_source(source, name=name)
    try:
        return (
            secondary_capture(record, overlay_png, source),
            structured_report(record, source, codes=codes),
        )
    except (ValueError, TypeError, AttributeError, OSError) as e:
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


@dataclass
class Report:
    """What an SR written by :func:`build` says, read back (tests, tools)."""

    title: tuple[str, str]
    finding: LabelCode | None = None
    score_name: str | None = None
    score: str | None = None  # as stored: three decimals
    comments: list[str] = field(default_factory=list)  # the Comment texts, in order
    texts: dict[str, str] = field(default_factory=dict)  # other TEXT items: meaning → text
    algorithm: dict[str, str] = field(default_factory=dict)  # name, version
    sources: list[str] = field(default_factory=list)  # referenced SOP instance UIDs


def _items(items: Any) -> Any:
    for item in items:
        yield item
        yield from _items(item.get("ContentSequence", []))


def read_report(sr: Dataset) -> Report:
    """The finding, score, texts, algorithm and sources of an SR made by :func:`build`."""
    title = sr.ConceptNameCodeSequence[0]
    report = Report(title=(str(title.CodeValue), str(title.CodingSchemeDesignator)))
    for item in _items(sr.ContentSequence):
        concept = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        meaning = str(concept.CodeMeaning) if concept is not None else ""
        key = (str(concept.CodeValue), str(concept.CodingSchemeDesignator)) if concept else None
        if item.ValueType == "CODE" and key == (FINDING.value, FINDING.scheme_designator):
            c = item.ConceptCodeSequence[0]
            value = str(c.get("CodeValue") or c.get("LongCodeValue"))
            report.finding = LabelCode(value, str(c.CodingSchemeDesignator), str(c.CodeMeaning))
        elif item.ValueType == "NUM" and meaning in (PROBABILITY.meaning, SCORE.meaning):
            report.score_name = meaning
            report.score = str(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "TEXT" and meaning in ("Algorithm Name", "Algorithm Version"):
            report.algorithm[meaning.split()[-1].lower()] = str(item.TextValue)
        elif item.ValueType == "TEXT" and key == (COMMENT.value, COMMENT.scheme_designator):
            report.comments.append(str(item.TextValue))
        elif item.ValueType == "TEXT":
            report.texts[meaning] = str(item.TextValue)
        elif item.ValueType == "IMAGE":
            ref = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if ref not in report.sources:
                report.sources.append(ref)
    return report
