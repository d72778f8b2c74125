"""A DICOM input is parsed once at the bedside: `Predictor.predict_file`, `edge predict --dicom`
and an `edge serve` upload each call pydicom's reader exactly once per image, and what the
header says (markers, study UIDs, the SC/SR results) comes from that one dataset.

The count wraps ``pydicom.dcmread`` (both names it is reached by); the inputs are real CXR
pixels from ../shared/data written as DICOM (``test_dicom.make_dicom``), the model the real
exported ONNX of tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.filereader
import pytest
from inproc import run
from starlette.testclient import TestClient
from test_dicom import make_dicom

from fedbridge_edge.preprocess import ImageTooLarge, decode_upload, list_images
from fedbridge_edge.record import Markers
from fedbridge_edge.runtime import Predictor
from fedbridge_edge.serve import Limits, make_app


@pytest.fixture
def parses(monkeypatch) -> list[dict]:
    """Every pydicom.dcmread call from now on (its keyword arguments), in order."""
    calls: list[dict] = []
    real = pydicom.dcmread

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    monkeypatch.setattr(pydicom.filereader, "dcmread", counting)
    return calls


@pytest.fixture(scope="module")
def cxr_dicom(cxr_parts, tmp_path_factory) -> Path:
    """A real chest X-ray as a DX DICOM hung as usual (PatientOrientation L\\F)."""
    image = list_images([cxr_parts["test"]])[0]
    out = tmp_path_factory.mktemp("once") / "film.dcm"
    return make_dicom(image, out, PatientOrientation=["L", "F"])


@pytest.fixture(scope="module")
def predictor(edge_onnx) -> Predictor:
    return Predictor(edge_onnx)


def test_predict_file_parses_a_dicom_once(predictor, cxr_dicom, parses):
    pred = predictor.predict_file(cxr_dicom)
    assert len(parses) == 1 and not parses[0].get("stop_before_pixels")
    assert pred.record.markers == Markers(left="R", right="L")  # from the one parse's header
    assert pred.record.markers_source == "DICOM PatientOrientation L\\F"
    assert pred.dicom is not None
    assert pred.dicom.SOPInstanceUID == pydicom.dcmread(cxr_dicom).SOPInstanceUID


def test_predict_file_on_a_png_parses_nothing(predictor, cxr_parts, parses):
    pred = predictor.predict_file(list_images([cxr_parts["test"]])[0])
    assert parses == [] and pred.dicom is None
    assert pred.record.markers is None and "PNG/JPEG" in pred.record.markers_source


def test_edge_predict_dicom_parses_each_input_once(edge_onnx, cxr_dicom, parses, capsys, tmp_path):
    out = tmp_path / "out"
    result = run(capsys, "edge", "predict", edge_onnx, cxr_dicom, "--out", out, "--dicom")
    assert result.returncode == 0, result.stderr
    assert len(parses) == 1, f"{len(parses)} parses of one DICOM input"
    parses.clear()
    source = pydicom.dcmread(cxr_dicom)
    sc, sr = pydicom.dcmread(out / "film.sc.dcm"), pydicom.dcmread(out / "film.sr.dcm")
    assert sc.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID == "FB-0001"


def test_edge_serve_parses_a_dicom_upload_once(edge_onnx, cxr_dicom, parses):
    app, _ = make_app(Predictor(edge_onnx), Limits())
    source = pydicom.dcmread(cxr_dicom)
    parses.clear()
    with TestClient(app) as client:
        r = client.post("/predict?overlay=dicom", content=cxr_dicom.read_bytes(),
                        headers={"content-type": "application/dicom"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert len(parses) == 1, f"{len(parses)} parses of one DICOM upload"
    body = r.json()
    assert body["study_instance_uid"] == source.StudyInstanceUID
    assert body["sop_instance_uid"] == source.SOPInstanceUID
    assert body["markers"] == {"left": "R", "right": "L"}
    assert body["overlay_dicom_base64"] and body["report_dicom_base64"]


def test_an_oversized_dicom_upload_is_refused_from_the_one_parse(cxr_dicom, parses):
    ds = pydicom.dcmread(cxr_dicom)
    parses.clear()
    with pytest.raises(ImageTooLarge, match="refused before decoding") as e:
        decode_upload(cxr_dicom.read_bytes(), "scan.dcm", max_pixels=ds.Rows * ds.Columns - 1)
    assert str(e.value).startswith(f"scan.dcm: image declares {ds.Columns}x{ds.Rows} px")
    assert len(parses) == 1
    decoded = decode_upload(cxr_dicom.read_bytes(), "scan.dcm", max_pixels=ds.Rows * ds.Columns)
    assert decoded.grey.shape == (ds.Rows, ds.Columns) and decoded.dicom is not None
