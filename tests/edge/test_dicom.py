"""DICOM in and out at the bedside: SC + SR results, `edge predict --dicom`, `edge listen`.

The DICOM inputs are made from real chest X-ray pixels (../shared/data holds no DICOM). The
SC and SR tests build records directly (no model) and check every object with dicom3tools'
``dciodvfy`` (no Error, no Warning) and dcmtk's ``dsrdump``; both must be installed (CI
installs them): a missing tool fails the tests. The network tests run on loopback only:
pynetdicom's own ``storescu`` plays the modality, an in-test pynetdicom SCP plays the PACS.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cli import assert_one_line_error, fedbridge, launch, ok
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedbridge_edge import dicom_out, overlay
from fedbridge_edge.preprocess import list_images
from fedbridge_edge.record import ModelIdentity, PredictionRecord
from fedbridge_edge.runtime import Predictor
from fedbridge_shared import label_codes
from fedbridge_shared.processes import stop

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
SC = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
CXR_LABELS = ["BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA"]
CODES = label_codes.default_codes(CXR_LABELS)
SEAL = "5e" * 32
POLLS = 150  # bounded waits: at most POLLS × 0.2 s


def make_dicom(
    image: Path, out: Path, *, patient: str = "FB-0001", sop_class: str = DX, **attrs
) -> Path:
    """A DX DICOM file of ``image``'s real pixels with patient and study identifiers.

    ``attrs`` adds or replaces attributes (Laterality, PatientOrientation, ...).
    """
    pixels = np.asarray(Image.open(image).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = patient, "Tester^Jane"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyID, ds.AccessionNumber = "S1", "ACC-42"
    ds.StudyDate, ds.StudyTime = "20261201", "101500"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def in_distribution(predictor: Predictor, images: list[Path]) -> Path:
    """The first test image the model assesses (not out of distribution)."""
    for path in images[:20]:
        if not predictor.predict_file(path).ood:
            return path
    raise AssertionError("none of the first 20 test images is in distribution")


@pytest.fixture(scope="module")
def cxr_dicoms(edge_onnx, cxr_parts, tmp_path_factory) -> list[Path]:
    """Two real CXR images, in distribution for ``edge_onnx``, as DICOM files."""
    predictor = Predictor(edge_onnx)
    images = list_images([cxr_parts["test"]])
    first = in_distribution(predictor, images)
    second = in_distribution(predictor, [p for p in images if p != first])
    root = tmp_path_factory.mktemp("dicom")
    return [
        make_dicom(first, root / "a.dcm", patient="FB-0001"),
        make_dicom(second, root / "b.dcm", patient="FB-0002"),
    ]


def roundtrip(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(dicom_out.encode(ds)))


# ------------------------------------------- SC and SR from records (no model), checked


def model(seal: str = SEAL, *, calibrated: bool = False) -> ModelIdentity:
    return ModelIdentity(
        name="mobilenetv2_100", sha256=seal, modality="cxr", version="0.0.test",
        calibrated=calibrated,
    )  # fmt: skip


def record(*, ood: bool = False, seal: str = SEAL, calibrated: bool = False) -> PredictionRecord:
    """An ok COVID19 record (scores sum to 1), or an out-of-distribution one."""
    return PredictionRecord(
        image="a.dcm",
        status="out_of_distribution" if ood else "ok",
        label=None if ood else "COVID19",
        scores=None if ood else dict(zip(CXR_LABELS, (0.05, 0.9, 0.03, 0.02), strict=True)),
        score_kind="probability" if calibrated else "score",
        reason="the image's pixel statistics are unlike the calibration images" if ood else None,
        ood_score=3.5 if ood else 0.4,
        ood_threshold=1.2,
        energy=-2.0,
        markers=None,
        markers_source="PatientOrientation absent",
        cam_label=None if ood else "COVID19",
        model=model(seal, calibrated=calibrated),
        backend="onnxruntime",
        latency_ms=12.0,
        inference_ms=8.0,
    )


def overlay_png(image: Path, rec: PredictionRecord) -> bytes:
    """The bedside overlay of a real image (a flat map stands in for the CAM)."""
    grey = np.asarray(Image.open(image).convert("L"), dtype=np.uint8)
    cam = None if rec.ood else np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    caption = overlay.Caption(verdict=rec.summary(), ood=rec.ood, model=rec.model.name)
    return overlay.png_bytes(overlay.render(grey, cam, caption=caption, reference=1.0))


@pytest.fixture(scope="module")
def cxr_image(cxr_root) -> Path:
    return sorted((cxr_root / "COVID19").iterdir())[0]


SOURCES = {
    # a DX chest film as modalities send it: ImageLaterality U, the orientation, spacing
    "dx-chest": {
        "ImageLaterality": "U", "BodyPartExamined": "CHEST",
        "PatientOrientation": ["R", "F"], "ImagerPixelSpacing": [0.139, 0.139],
    },
    "laterality-and-orientation": {"Laterality": "R", "PatientOrientation": ["A", "F"]},
    "chest-without-laterality-or-orientation": {"BodyPartExamined": "CHEST"},
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source_file(request, cxr_image, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    return make_dicom(cxr_image, root / f"{request.param}.dcm", **SOURCES[request.param])


def dciodvfy(ds: Dataset, tmp_path: Path) -> list[str]:
    """dciodvfy's Error and Warning lines for ``ds`` written as a file."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy not installed (apt-get install dicom3tools): DICOM output unchecked"
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(dicom_out.encode(ds))
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [x for x in lines if x.startswith(("Error", "Warning"))]


def build(rec: PredictionRecord, source: Dataset, image: Path) -> tuple[Dataset, Dataset]:
    sc, sr = dicom_out.build(rec, overlay_png(image, rec), source, codes=CODES, name="a.dcm")
    return roundtrip(sc), roundtrip(sr)


@pytest.mark.parametrize("ood", [False, True], ids=["ok", "out-of-distribution"])
def test_sc_and_sr_pass_dciodvfy_without_errors_or_warnings(source_file, cxr_image, ood, tmp_path):
    source = pydicom.dcmread(source_file)
    for ds in build(record(ood=ood), source, cxr_image):
        problems = dciodvfy(ds, tmp_path)
        assert not problems, f"{ds.SOPClassUID} of {source_file.name}:\n" + "\n".join(problems)


def test_sc_and_sr_join_the_source_study_in_the_models_ai_series(source_file, cxr_image):
    source = pydicom.dcmread(source_file)
    rec = record()
    sc, sr = build(rec, source, cxr_image)
    for ds in (sc, sr):
        for key in dicom_out.COPIED:
            assert str(ds.get(key)) == str(source.get(key)), key
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.Manufacturer == "fedbridge" and ds.SeriesDate and ds.SeriesTime
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID
    assert (sc.SeriesNumber, sr.SeriesNumber) == (9901, 9902)
    assert sc.SeriesDescription == "fedbridge overlay mobilenetv2_100"
    assert sr.SeriesDescription == "fedbridge AI result mobilenetv2_100"
    assert sc.SOPClassUID == SC and sc.Modality == "OT" and sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.ContentDate
    overlay_rgb = np.asarray(Image.open(io.BytesIO(overlay_png(cxr_image, rec))).convert("RGB"))
    np.testing.assert_array_equal(sc.pixel_array, overlay_rgb)
    assert list(sc.PatientOrientation or []) == list(source.get("PatientOrientation") or [])
    said = source.get("BodyPartExamined") or source.get("Laterality")
    assert sc.get("BodyPartExamined") == (source.get("BodyPartExamined") if said else "CHEST")
    if "Laterality" in source:
        assert sc.Laterality == source.Laterality
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    refs = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert refs.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_sr_is_an_imaging_measurement_report_with_the_coded_finding(cxr_image, tmp_path):
    import highdicom as hd

    source = pydicom.dcmread(make_dicom(cxr_image, tmp_path / "s.dcm", **SOURCES["dx-chest"]))
    _, sr = build(record(), source, cxr_image)
    report = dicom_out.read_report(sr)
    assert report.title == ("126000", "DCM")
    assert report.finding is not None
    assert (report.finding.value, report.finding.scheme) == (CODES["COVID19"].value, "SCT")
    assert report.finding.meaning == CODES["COVID19"].meaning
    assert report.score == "0.900" and report.score_name == "Score (attribute)"
    assert report.algorithm == {"name": "fedbridge mobilenetv2_100", "version": SEAL}
    assert report.comments == ["research use only — not for diagnostic use"]
    assert report.sources == [source.SOPInstanceUID]  # image library and source of measurement
    assert "CodingSchemeIdentificationSequence" not in sr  # no local code used

    path = tmp_path / "r.sr.dcm"
    path.write_bytes(dicom_out.encode(sr))
    content = hd.sr.srread(path).content
    (device,) = content.get_observer_contexts()
    assert device.observer_identifying_attributes.name == "fedbridge mobilenetv2_100"
    (group,) = content.get_image_measurement_groups()
    # the coded evaluation (121071, DCM, "Finding") is what highdicom reads as the finding
    assert group.finding_type == hd.sr.CodedConcept("840539006", "SCT", "COVID-19")
    assert [s.referenced_sop_instance_uid for s in group.source_images] == [source.SOPInstanceUID]


def test_calibrated_scores_are_called_probabilities(cxr_image, tmp_path):
    source = pydicom.dcmread(make_dicom(cxr_image, tmp_path / "s.dcm", **SOURCES["dx-chest"]))
    _, sr = build(record(calibrated=True), source, cxr_image)
    report = dicom_out.read_report(sr)
    assert (report.score_name, report.score) == ("Probability", "0.900")
    assert not dciodvfy(sr, tmp_path)


def test_out_of_distribution_report_has_no_finding_and_says_why(cxr_image, tmp_path):
    source = pydicom.dcmread(make_dicom(cxr_image, tmp_path / "s.dcm", **SOURCES["dx-chest"]))
    rec = record(ood=True)
    _, sr = build(rec, source, cxr_image)
    report = dicom_out.read_report(sr)
    assert report.finding is None and report.score is None and report.score_name is None
    assert report.comments == [
        f"not assessed: out of distribution: {rec.reason}",
        "research use only — not for diagnostic use",
    ]
    assert report.sources == [source.SOPInstanceUID]


@pytest.mark.parametrize("ood", [False, True], ids=["ok", "out-of-distribution"])
def test_dsrdump_renders_the_report(cxr_image, tmp_path, ood):
    exe = shutil.which("dsrdump")
    assert exe, "dsrdump not installed (apt-get install dcmtk): SR rendering unchecked"
    source = pydicom.dcmread(make_dicom(cxr_image, tmp_path / "s.dcm", **SOURCES["dx-chest"]))
    _, sr = build(record(ood=ood), source, cxr_image)
    path = tmp_path / "r.sr.dcm"
    path.write_bytes(dicom_out.encode(sr))
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "research use" in result.stdout and "Imaging Measurement Report" in result.stdout
    assert ("COVID-19" in result.stdout) != ood
    assert ("not assessed" in result.stdout) == ood


def test_result_uids_are_stable_per_source_and_model(cxr_image, tmp_path):
    source = pydicom.dcmread(make_dicom(cxr_image, tmp_path / "s.dcm", **SOURCES["dx-chest"]))
    first, again = build(record(), source, cxr_image), build(record(), source, cxr_image)
    for a, b in zip(first, again, strict=True):
        assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
        assert a.InstanceNumber == b.InstanceNumber
    other = build(record(seal="77" * 32), source, cxr_image)
    for a, b in zip(first, other, strict=True):
        assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    # another image of the same study: same AI series, another instance
    second = pydicom.dcmread(source_file_copy(cxr_image, tmp_path, source))
    for a, b in zip(first, build(record(), second, cxr_image), strict=True):
        assert a.SeriesInstanceUID == b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID


def source_file_copy(image: Path, tmp_path: Path, source: Dataset) -> Path:
    """Another instance (new SOP Instance UID) of ``source``'s study."""
    return make_dicom(
        image, tmp_path / "second.dcm", StudyInstanceUID=source.StudyInstanceUID,
        **SOURCES["dx-chest"],
    )  # fmt: skip


def test_a_source_that_says_nothing_of_laterality(cxr_image, tmp_path):
    """Neither Laterality, ImageLaterality nor BodyPartExamined. A chest model's SC says CHEST
    (the sealed modality), so no Laterality is due and dciodvfy is silent. A model of another
    modality cannot tell: Laterality is empty (unknown), never absent (dciodvfy's Type 2C
    error), and dciodvfy's note that empty means unknown is the only line left."""
    source = pydicom.dcmread(make_dicom(cxr_image, tmp_path / "bare.dcm"))
    sc, sr = build(record(), source, cxr_image)
    assert sc.BodyPartExamined == "CHEST" and "Laterality" not in sc
    assert not dciodvfy(sc, tmp_path) and not dciodvfy(sr, tmp_path)
    other = record().model_copy(update={"model": model().model_copy(update={"modality": "other"})})
    sc, sr = build(other, source, cxr_image)
    assert "Laterality" in sc and sc.Laterality == "" and sc.PatientOrientation == ""
    assert "BodyPartExamined" not in sc
    problems = dciodvfy(sc, tmp_path)
    assert len(problems) == 1 and "attribute <Laterality>" in problems[0], problems
    assert not dciodvfy(sr, tmp_path)


def test_a_label_without_snomed_code_uses_the_declared_local_scheme(cxr_image, tmp_path):
    source = pydicom.dcmread(make_dicom(cxr_image, tmp_path / "s.dcm", **SOURCES["dx-chest"]))
    codes = {**CODES, "COVID19": label_codes.LabelCode("COVID19", label_codes.LOCAL_SCHEME, "C")}
    rec = record()
    _, sr = dicom_out.build(rec, overlay_png(cxr_image, rec), source, codes=codes, name="a")
    declared = roundtrip(sr).CodingSchemeIdentificationSequence
    assert [d.CodingSchemeDesignator for d in declared] == ["99FEDBRIDGE"]
    finding = dicom_out.read_report(roundtrip(sr)).finding
    assert finding == label_codes.LabelCode("COVID19", "99FEDBRIDGE", "C")


def test_source_without_uids_is_refused(cxr_image, tmp_path):
    source = pydicom.dcmread(make_dicom(cxr_image, tmp_path / "s.dcm"))
    del source.StudyInstanceUID
    with pytest.raises(dicom_out.EdgeError, match="without StudyInstanceUID"):
        dicom_out.build(record(), b"", source, codes=CODES, name="a.dcm")


def test_a_label_missing_from_the_code_table_is_an_edge_error(cxr_image, tmp_path):
    source = pydicom.dcmread(make_dicom(cxr_image, tmp_path / "s.dcm"))
    rec = record()
    codes = {k: v for k, v in CODES.items() if k != "COVID19"}
    with pytest.raises(dicom_out.EdgeError, match="a.dcm: cannot make DICOM results.*COVID19"):
        dicom_out.build(rec, overlay_png(cxr_image, rec), source, codes=codes, name="a.dcm")


def test_predict_dicom_folder_writes_sc_sr_and_summary(edge_onnx, cxr_dicoms, photo_png, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in (*cxr_dicoms, photo_png):
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    ok("edge", "predict", edge_onnx, folder, "--out", out, "--dicom")
    for p in cxr_dicoms:
        source = pydicom.dcmread(p)
        sc, sr = (
            pydicom.dcmread(out / f"{p.stem}.sc.dcm"),
            pydicom.dcmread(out / f"{p.stem}.sr.dcm"),
        )
        assert sc.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID
        assert sc.PatientID == sr.PatientID == source.PatientID
        record = json.loads((out / f"{p.stem}.json").read_text())
        assert dicom_out.read_report(sr).finding == CODES[record["label"]]
    assert not list(out.glob("photo*.dcm"))
    assert (out / "photo.json").is_file()
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines) == 3
    by_name = {Path(r["image"]).name: r for r in lines}
    assert set(by_name) == {"a.dcm", "b.dcm", "photo.jpg"}
    assert by_name["photo.jpg"]["status"] == "out_of_distribution"
    assert by_name["photo.jpg"]["label"] is None and by_name["photo.jpg"]["top_score"] is None
    for name in ("a.dcm", "b.dcm"):
        r = by_name[name]
        assert r["status"] == "ok" and r["label"] and 0 < r["top_score"] <= 1
        assert r["model_sha256"] == Predictor(edge_onnx).sha256
    assert [r["image"] for r in rows] == [r["image"] for r in lines]


def test_predict_dicom_refuses_inputs_without_dicom(edge_onnx, photo_png, tmp_path):
    result = fedbridge("edge", "predict", edge_onnx, photo_png, "--out", tmp_path / "o", "--dicom")
    assert_one_line_error(result, "--dicom", "none of the inputs is a DICOM")
    assert not (tmp_path / "o").exists()


def test_listen_refuses_bad_options(edge_onnx, tmp_path):
    cases = [
        (("--forward", "pacs.local"), "--forward"),
        (("--forward", "pacs:99999"), "port must be in"),
        (("--ae-title", "A" * 17), "--ae-title"),
        (("--port", "70000"), "--port"),
    ]
    for args, needle in cases:
        result = fedbridge("edge", "listen", edge_onnx, "--out", tmp_path / "o", *args)
        assert_one_line_error(result, needle)


class Pacs:
    """An in-test C-STORE SCP on a free loopback port, keeping what it receives."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.received: list[Dataset] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return 0x0000

    def of_study(self, study: str) -> list[Dataset]:
        with self.lock:
            return [d for d in self.received if d.StudyInstanceUID == study]


def poll(condition, what: str):
    for _ in range(POLLS):
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def storescu(port: int, path: Path) -> subprocess.CompletedProcess:
    """pynetdicom's own storescu app, as a modality would send."""
    return subprocess.run(
        [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(port), str(path),
         "-aec", "FEDBRIDGE", "-aet", "MODALITY"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def send_status(port: int, ds: Dataset) -> int:
    """C-STORE ``ds`` from an in-test SCU; the status the listener answered."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="FEDBRIDGE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_listen_predicts_writes_and_forwards_to_pacs(edge_onnx, cxr_dicoms, tmp_path):
    pacs = Pacs()
    out, log = tmp_path / "results", tmp_path / "listen.log"
    proc = launch(
        "edge", "listen", edge_onnx, "--port", "0", "--out", out,
        "--forward", f"127.0.0.1:{pacs.port}:PACS", log=log,
    )  # fmt: skip
    try:
        line = poll(
            lambda: (
                next((x for x in log.read_text().splitlines() if "listening on" in x), None)
                or (proc.poll() is not None and f"exited: {log.read_text()}")
            ),
            "the listener to print its address",
        )
        assert "listening on 127.0.0.1:" in line, line
        port = int(line.split("listening on 127.0.0.1:")[1].split()[0])

        source = pydicom.dcmread(cxr_dicoms[0])
        sent = storescu(port, cxr_dicoms[0])
        assert sent.returncode == 0, sent.stderr
        got = poll(lambda: len(pacs.of_study(source.StudyInstanceUID)) >= 2 and pacs, "the PACS")
        by_class = {d.SOPClassUID: d for d in got.of_study(source.StudyInstanceUID)}
        assert set(by_class) == {SC, COMPREHENSIVE_SR}
        record_path = out / source.StudyInstanceUID / f"{source.SOPInstanceUID}.json"
        record = json.loads(poll(lambda: record_path.is_file() and record_path, "JSON").read_text())
        sr = by_class[COMPREHENSIVE_SR]
        assert dicom_out.read_report(sr).finding == CODES[record["label"]]
        assert sr.PatientID == by_class[SC].PatientID == source.PatientID
        study = out / source.StudyInstanceUID
        for suffix in (".dcm", ".sc.dcm", ".sr.dcm", ".overlay.png"):
            assert (study / f"{source.SOPInstanceUID}{suffix}").stat().st_size > 0
        stored_sr = pydicom.dcmread(study / f"{source.SOPInstanceUID}.sr.dcm")
        assert stored_sr.SOPInstanceUID == sr.SOPInstanceUID

        # not an image (no pixel data): a failure status, one log line, the listener goes on
        bare = pydicom.dcmread(cxr_dicoms[1])
        del bare.PixelData
        bare.SOPInstanceUID = generate_uid()
        status = send_status(port, bare)
        assert 0xC000 <= status <= 0xCFFF, hex(status)
        assert not (out / bare.StudyInstanceUID).exists()
        second = pydicom.dcmread(cxr_dicoms[1])
        assert storescu(port, cxr_dicoms[1]).returncode == 0
        poll(lambda: len(pacs.of_study(second.StudyInstanceUID)) >= 2, "the second forward")
    finally:
        stop([proc])
        pacs.server.shutdown()
    text = log.read_text()
    assert "Traceback" not in text
    assert f"refused MODALITY:{bare.SOPInstanceUID}" in text
    assert text.count("forwarded ") == 4 and "stopped" in text
    assert proc.returncode == 0, text


def test_uids_that_are_not_uids_are_refused():
    source = Dataset()
    source.StudyInstanceUID, source.SeriesInstanceUID = "../../etc", generate_uid()
    source.SOPInstanceUID, source.SOPClassUID = generate_uid(), DX
    with pytest.raises(dicom_out.EdgeError, match="StudyInstanceUID .* is not a valid UID"):
        dicom_out.check_source(source, name="x.dcm")


def test_forward_to_a_pacs_that_is_down_reports_each_instance():
    import socket

    from fedbridge_edge.listen import Destination, send

    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        dest = Destination.parse(f"127.0.0.1:{s.getsockname()[1]}:PACS")
        items = []
        for _ in range(2):
            ds = Dataset()
            ds.SOPInstanceUID = generate_uid()
            items.append(ds)
        results = send(items, dest, ae_title="FEDBRIDGE", timeout=5)
    assert [uid for uid, _ in results] == [str(d.SOPInstanceUID) for d in items]
    assert all(error and "PACS" in error for _, error in results), results
