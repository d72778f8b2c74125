"""DICOM in and out at the bedside: SC + SR results, `edge predict --dicom`, `edge listen`.

The DICOM inputs are made from real chest X-ray pixels (../shared/data holds no DICOM). The
network tests run on loopback only: pynetdicom's own ``storescu`` plays the modality, an
in-test pynetdicom SCP plays the PACS.
"""

from __future__ import annotations

import csv
import io
import json
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

from fedbridge_edge import dicom_out
from fedbridge_edge.preprocess import list_images
from fedbridge_edge.runtime import Predictor
from fedbridge_shared.processes import stop

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
SC = "1.2.840.10008.5.1.4.1.1.7"
POLLS = 150  # bounded waits: at most POLLS × 0.2 s


def make_dicom(image: Path, out: Path, *, patient: str = "FB-0001", sop_class: str = DX) -> Path:
    """A DX DICOM file of ``image``'s real pixels with patient and study identifiers."""
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


def test_sc_and_sr_of_a_real_cxr_join_its_study(edge_onnx, cxr_dicoms):
    predictor = Predictor(edge_onnx)
    source = pydicom.dcmread(cxr_dicoms[0])
    pred = predictor.predict_file(cxr_dicoms[0])
    assert not pred.ood
    sc, sr = (roundtrip(d) for d in dicom_out.build(pred, source, model_name="m", name="a"))
    for ds in (sc, sr):
        for key in dicom_out.COPIED:
            assert str(ds.get(key)) == str(source.get(key)), key
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SOPInstanceUID != source.SOPInstanceUID
        assert ds.Manufacturer == "fedbridge"
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID
    assert sc.SOPClassUID == SC and sc.Modality == "OT"
    assert sc.SeriesDescription == "fedbridge overlay — research use only"
    assert sc.BurnedInAnnotation == "YES" and pred.label in sc.ImageComments
    overlay = np.asarray(Image.open(io.BytesIO(pred.overlay_png())).convert("RGB"))
    np.testing.assert_array_equal(sc.pixel_array, overlay)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.Modality == "SR"
    values = dicom_out.report_values(sr)
    assert values["Finding"] == pred.label
    assert values["Assessment status"] == "assessed"
    for label, p in pred.probabilities.items():
        assert values[f"Probability of {label}"] == pytest.approx(p, abs=1e-6)
    assert values["Model SHA-256"] == predictor.sha256
    assert values["Out of distribution"] == "no"
    assert values["Source of Measurement"] == source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    refs = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert refs.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_out_of_distribution_report_has_no_finding(edge_onnx, noise_png, tmp_path):
    path = make_dicom(noise_png, tmp_path / "noise.dcm")
    pred = Predictor(edge_onnx).predict_file(path)
    assert pred.ood, "noise must be flagged out of distribution by the edge model"
    _, sr = dicom_out.build(pred, pydicom.dcmread(path), model_name="m", name="noise")
    values = dicom_out.report_values(roundtrip(sr))
    assert "Finding" not in values
    assert not any(k.startswith("Probability of") for k in values)
    assert values["Assessment status"] == "not assessed: out of distribution"
    assert values["Reason not assessed"] == pred.reason
    assert values["Out of distribution"] == "yes"
    assert values["Out-of-distribution threshold"] == pytest.approx(pred.ood_threshold)


def test_source_without_uids_is_refused(edge_onnx, cxr_dicoms):
    source = pydicom.dcmread(cxr_dicoms[0])
    pred = Predictor(edge_onnx).predict_file(cxr_dicoms[0])
    del source.StudyInstanceUID
    with pytest.raises(dicom_out.EdgeError, match="without StudyInstanceUID"):
        dicom_out.build(pred, source, model_name="m", name="a.dcm")


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
        assert dicom_out.report_values(sr).get("Finding") == record["label"]
    assert not list(out.glob("photo*.dcm"))
    assert (out / "photo.json").is_file()
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines) == 3
    by_name = {Path(r["image"]).name: r for r in lines}
    assert set(by_name) == {"a.dcm", "b.dcm", "photo.jpg"}
    assert by_name["photo.jpg"]["ood"] is True and by_name["photo.jpg"]["label"] is None
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
        assert set(by_class) == {SC, "1.2.840.10008.5.1.4.1.1.88.33"}
        record_path = out / source.StudyInstanceUID / f"{source.SOPInstanceUID}.json"
        record = json.loads(poll(lambda: record_path.is_file() and record_path, "JSON").read_text())
        sr = by_class["1.2.840.10008.5.1.4.1.1.88.33"]
        assert dicom_out.report_values(sr)["Finding"] == record["label"]
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
