"""`edge listen` in a hospital: what it refuses, what it keeps, and a real PACS going away.

The PACS is a real Orthanc (Debian package ``orthanc``) and the modality dcmtk's ``storescu``,
both on loopback on free ports; the images are real chest X-rays made into DX objects. Orthanc is
stopped while a result waits, the listener is SIGKILLed with it pending, and after both come back
every result must be in Orthanc exactly once. Missing tools fail these tests; they never skip.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import cli
import numpy as np
import pydicom
import pytest
from cli import launch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedbridge_edge import listen as listen_mod
from fedbridge_edge.listen import Listener, Refused, check_original
from fedbridge_edge.preprocess import list_images
from fedbridge_edge.runtime import Predictor
from fedbridge_shared.processes import stop

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR = "1.2.840.10008.5.1.4.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
ORTHANC = "/usr/sbin/Orthanc"
DEADLINE = 90.0  # seconds, for every bounded wait (the outbox's back-off is capped at 60 s)


def tool(name: str) -> str:
    """The path of a required system tool: a missing one fails the test (make system-packages)."""
    found = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
    assert found, f"{name} is missing: run `make system-packages` (orthanc dcmtk dicom3tools)"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


wait_for = functools.partial(cli.wait_for, deadline=DEADLINE)


def make_dicom(
    image: Path,
    out: Path,
    *,
    patient: str = "FB-0001",
    sop_class: str = DX,
    study: str | None = None,
    sop: str | None = None,
    **extra,
) -> Path:
    """An original DX (or ``sop_class``) object of ``image``'s real pixels."""
    pixels = np.asarray(Image.open(image).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientID, ds.PatientName = patient, "Tester^Jane"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyID, ds.AccessionNumber = "S1", "ACC-42"
    ds.StudyDate, ds.StudyTime = "20261201", "101500"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.Manufacturer = "ACME X-Ray"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def cxr_images(cxr_parts) -> list[Path]:
    images = list_images([cxr_parts["test"]])
    assert len(images) >= 3
    return images[:3]


def send_status(port: int, ds: Dataset) -> int | None:
    """C-STORE ``ds`` from an in-test SCU: the listener's status, None when it accepted no
    presentation context for the SOP class (refused at negotiation)."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="FEDBRIDGE")
    if not assoc.is_established:  # pynetdicom aborts when no context is accepted
        return None
    try:
        if not any(cx.abstract_syntax == ds.SOPClassUID for cx in assoc.accepted_contexts):
            return None
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_check_original_needs_the_context_and_dataset_to_be_cr_or_dx():
    ds = Dataset()
    ds.SOPClassUID, ds.ImageType = DX, ["ORIGINAL", "PRIMARY"]
    check_original(ds, DX, name="ok")
    ds.SOPClassUID = CR
    check_original(ds, CR, name="ok")
    cases = [
        (SR, DX, 0xA900, "does not match"),  # an SR's dataset in a DX context
        (RT_DOSE, RT_DOSE, 0xA900, "not CR or DX"),
        (SC, SC, 0xA900, "not CR or DX"),
        (DX, CR, 0xA900, "does not match"),
    ]
    for sop, context, status, needle in cases:
        ds.SOPClassUID = sop
        with pytest.raises(Refused, match=needle) as info:
            check_original(ds, context, name="x")
        assert info.value.status == status
    ds.SOPClassUID = DX
    for image_type in (["DERIVED", "PRIMARY"], ["ORIGINAL", "SECONDARY"]):
        ds.ImageType = image_type
        with pytest.raises(Refused, match="not an original acquisition"):
            check_original(ds, DX, name="x")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    for key, value in (("Manufacturer", "fedbridge"), ("SoftwareVersions", ["x", "fedbridge 0.1"])):
        made = Dataset()
        made.update(ds)
        setattr(made, key, value)
        with pytest.raises(Refused, match="made by fedbridge") as info:
            check_original(made, DX, name="x")
        assert info.value.status == 0xC002


def test_listener_diagnoses_only_original_acquisitions(
    edge_onnx, cxr_images, tmp_path, caplog, monkeypatch
):
    # nothing may go through the system temp folder: make it unusable
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-system-temp"))
    out = tmp_path / "out"
    listener = Listener(Predictor(edge_onnx), out=out)
    old_umask = os.umask(0)  # the listener's modes must not depend on it
    try:
        _, port = listener.start("127.0.0.1", 0)
        original = pydicom.dcmread(make_dicom(cxr_images[0], tmp_path / "in" / "a.dcm"))
        assert send_status(port, original) == 0x0000
        study = out / original.StudyInstanceUID
        stem = original.SOPInstanceUID
        written = sorted(p.name for p in study.iterdir())
        assert written == sorted(f"{stem}{s}" for s in listen_mod.RESULT_SUFFIXES)
        assert all(mode(p) == 0o600 for p in study.iterdir()), {p: mode(p) for p in study.iterdir()}
        assert mode(study) == 0o700 and mode(out) == 0o700
        assert (study / f"{stem}.dcm").read_bytes()[128:132] == b"DICM"

        # the device's own Secondary Capture and SR sent back: no context accepted for them
        for result in ("sc", "sr"):
            back = pydicom.dcmread(study / f"{stem}.{result}.dcm")
            assert send_status(port, back) is None
        # an SR-class object with pixels, an RT Dose: refused at negotiation
        for sop_class in (SR, RT_DOSE):
            odd = make_dicom(cxr_images[1], tmp_path / "in" / "odd.dcm", sop_class=sop_class)
            assert send_status(port, pydicom.dcmread(odd)) is None
        # a DX that is derived, or that fedbridge made (relabelled as DX): failure statuses
        refused = {
            "derived": dict(ImageType=["DERIVED", "PRIMARY"]),
            "secondary": dict(ImageType=["ORIGINAL", "SECONDARY"]),
            "made by fedbridge": dict(Manufacturer="fedbridge"),
            "fedbridge software": dict(SoftwareVersions="fedbridge 0.0.1"),
        }
        refused_uids = []
        for i, (what, attrs) in enumerate(refused.items()):
            path = make_dicom(cxr_images[1], tmp_path / "in" / f"r{i}.dcm", **attrs)
            ds = pydicom.dcmread(path)
            refused_uids.append(ds.StudyInstanceUID)
            assert send_status(port, ds) == 0xC002, what
        # the same Study + SOP Instance UID for another patient: refused, the first kept
        clash = make_dicom(
            cxr_images[1], tmp_path / "in" / "clash.dcm", patient="SOMEONE-ELSE",
            study=original.StudyInstanceUID, sop=original.SOPInstanceUID,
        )  # fmt: skip
        before = {p.name: p.read_bytes() for p in study.iterdir()}
        assert send_status(port, pydicom.dcmread(clash)) == 0xC003
        assert {p.name: p.read_bytes() for p in study.iterdir()} == before
        # the same object again (same patient): accepted, its results replaced
        assert send_status(port, original) == 0x0000
        # and the listener still serves
        second = pydicom.dcmread(make_dicom(cxr_images[2], tmp_path / "in" / "c.dcm"))
        assert send_status(port, second) == 0x0000
    finally:
        os.umask(old_umask)
        listener.stop()
    assert not any((out / uid).exists() for uid in refused_uids)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [original.StudyInstanceUID, second.StudyInstanceUID]
    )
    assert not (tmp_path / "no-system-temp").exists()
    text = caplog.text
    assert text.count("not an original acquisition") == 2
    assert text.count("made by fedbridge") == 2
    assert "already received for another PatientID" in text
    assert "Traceback" not in text


def test_retention_removes_only_the_listeners_delivered_results(edge_onnx, cxr_images, tmp_path):
    out = tmp_path / "out"
    listener = Listener(Predictor(edge_onnx), out=out, retention_days=2)
    try:
        _, port = listener.start("127.0.0.1", 0)
        ds = pydicom.dcmread(make_dicom(cxr_images[0], tmp_path / "a.dcm"))
        assert send_status(port, ds) == 0
    finally:
        listener.stop()
    study = out / ds.StudyInstanceUID
    notes = study / "notes.txt"  # a person's file in the same folder
    notes.write_text("keep me")
    other = out / "1.2.3.4"  # a folder the listener did not fill
    other.mkdir()
    (other / "x.json").write_text("{}")
    assert listener.sweep(now=time.time() + 86400) == 0  # one day: too young
    assert listener.sweep(now=time.time() + 3 * 86400) == 1
    assert sorted(p.name for p in study.iterdir()) == ["notes.txt"]
    assert (other / "x.json").is_file()  # not a result the listener wrote (no UID stem)
    notes.unlink()
    assert listener.sweep(now=time.time() + 3 * 86400) == 0
    assert not study.exists()


class Orthanc:
    """A real Orthanc on loopback: free DICOM and HTTP ports, its storage under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dicom_port, self.http_port = free_port(), free_port()
        self.config = root / "orthanc.json"
        storage = root / "db"
        storage.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            json.dumps(
                {
                    "Name": "fedbridge-test",
                    "StorageDirectory": str(storage),
                    "IndexDirectory": str(storage),
                    "HttpPort": self.http_port,
                    "DicomPort": self.dicom_port,
                    "DicomAet": "ORTHANC",
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomModalities": {},
                    "DicomCheckCalledAet": False,
                    "DicomAlwaysAllowStore": True,
                    "DicomAlwaysAllowEcho": True,
                    "UnknownSopClassAccepted": False,
                    "Plugins": [],
                    "LuaScripts": [],
                    "SaveJobs": False,
                    "ConcurrentJobs": 1,
                    "StorageCompression": False,
                }
            )
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "orthanc.log", "a")  # noqa: SIM115 - the child keeps a copy
        try:
            self.proc = subprocess.Popen(
                [tool(ORTHANC), str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.root,
            )  # fmt: skip
        finally:
            log.close()
        wait_for(lambda: self._up(), "Orthanc's REST API", deadline=60)

    def _up(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (
            f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}"
        )
        try:
            self.get("/system")
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop([self.proc])
            self.proc = None

    def get(self, path: str):
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def instances(self) -> list[dict]:
        return [self.get(f"/instances/{i}/simplified-tags") for i in self.get("/instances")]


def storescu(port: int, path: Path) -> subprocess.CompletedProcess:
    """dcmtk's storescu, as a modality sends."""
    return subprocess.run(
        [tool("storescu"), "-aet", "MODALITY", "-aec", "FEDBRIDGE", "127.0.0.1", str(port),
         str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def start_listener(model: Path, out: Path, orthanc: Orthanc, log: Path):
    """``fedbridge edge listen`` forwarding to ``orthanc``: (process, its DICOM port)."""
    starts = log.read_text().count("listening on") if log.exists() else 0  # the log is appended
    proc = launch(
        "edge", "listen", model, "--port", "0", "--out", out,
        "--forward", f"127.0.0.1:{orthanc.dicom_port}:ORTHANC", log=log,
    )  # fmt: skip

    def address():
        assert proc.poll() is None, f"the listener exited: {log.read_text()[-3000:]}"
        found = [x for x in log.read_text().splitlines() if "listening on 127.0.0.1:" in x]
        return found[-1] if len(found) > starts else None

    line = wait_for(address, "the listener")
    return proc, int(line.split("listening on 127.0.0.1:")[1].split()[0])


def pending(out: Path) -> list[Path]:
    return sorted((out / "outbox").glob("*.send.json"))


def check_results(orthanc: Orthanc, sources: list[Dataset]) -> list[dict]:
    """Every source's SC and SR in Orthanc exactly once, in the source's study and patient."""
    found = orthanc.instances()
    for source in sources:
        mine = [i for i in found if i["StudyInstanceUID"] == source.StudyInstanceUID]
        assert sorted(i["SOPClassUID"] for i in mine) == sorted([SC, SR]), mine
        assert all(i["PatientID"] == source.PatientID for i in mine)
    assert len(found) == 2 * len(sources), [i["SOPInstanceUID"] for i in found]
    assert len({i["SOPInstanceUID"] for i in found}) == len(found)
    return found


def test_results_reach_orthanc_exactly_once_across_an_outage_and_a_sigkill(
    edge_onnx, cxr_images, tmp_path
):
    tool("storescu")
    orthanc = Orthanc(tmp_path / "orthanc")
    out, log = tmp_path / "results", tmp_path / "listen.log"
    files = [
        make_dicom(image, tmp_path / "in" / f"{i}.dcm", patient=f"FB-{i}")
        for i, image in enumerate(cxr_images)
    ]
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    proc = None
    try:
        orthanc.start()
        proc, port = start_listener(edge_onnx, out, orthanc, log)
        for f in files[:2]:
            sent = storescu(port, f)
            assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_for(lambda: len(orthanc.instances()) == 4 and not pending(out), "the first results")
        check_results(orthanc, sources[:2])

        orthanc.stop()  # the PACS goes away; the modality still gets Success
        sent = storescu(port, files[2])
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "E:" not in sent.stderr, sent.stderr
        assert (out / sources[2].StudyInstanceUID / f"{sources[2].SOPInstanceUID}.dcm").is_file()
        wait_for(
            lambda: (
                len(pending(out)) == 1
                and json.loads((out / "outbox" / "status.json").read_text())["last_error"]
            ),
            "a failed send in the outbox",
        )
        os.kill(proc.pid, signal.SIGKILL)  # no goodbye: the outbox is all that remains
        proc.wait(timeout=30)
        assert len(pending(out)) == 1

        proc, port = start_listener(edge_onnx, out, orthanc, log)  # the PACS still down
        assert "outbox: 1 pending for 127.0.0.1" in log.read_text()
        time.sleep(3)  # a few failed tries: the back-off grows
        orthanc.start()
        back = time.monotonic()
        wait_for(lambda: not pending(out), "the outbox to drain")
        drained = time.monotonic() - back
        print(f"\noutbox drained {drained:.1f} s after the PACS came back")
        check_results(orthanc, sources)
        status = json.loads((out / "outbox" / "status.json").read_text())
        assert status["pending"] == 0 or wait_for(
            lambda: json.loads((out / "outbox" / "status.json").read_text())["pending"] == 0,
            "status.json to say empty",
        )
    finally:
        if proc is not None:
            stop([proc])
        orthanc.stop()
    text = log.read_text()
    assert "Traceback" not in text
    assert text.count("forwarded ") == 6
    assert "outbox: empty, everything delivered" in text
    assert mode(out / "outbox") == 0o700
    assert all(mode(p) == 0o600 for p in out.rglob("*") if p.is_file())


def test_resending_an_image_replaces_its_results_in_orthanc(edge_onnx, cxr_images, tmp_path):
    tool("storescu")
    orthanc = Orthanc(tmp_path / "orthanc")
    out, log = tmp_path / "results", tmp_path / "listen.log"
    path = make_dicom(cxr_images[0], tmp_path / "in" / "a.dcm")
    source = pydicom.dcmread(path, stop_before_pixels=True)
    proc = None
    try:
        orthanc.start()
        proc, port = start_listener(edge_onnx, out, orthanc, log)
        for attempt in (1, 2):
            assert storescu(port, path).returncode == 0
            wait_for(
                lambda n=attempt: log.read_text().count("forwarded ") == 2 * n and not pending(out),
                "the results",
            )
        check_results(orthanc, [source])
    finally:
        if proc is not None:
            stop([proc])
        orthanc.stop()
