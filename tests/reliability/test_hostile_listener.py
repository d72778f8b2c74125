"""Issue #30, the bedside: a DICOM listener nobody can lock out or exhaust.

The real ``fedbridge edge listen`` (a subprocess) serves dcmtk's ``storescu`` while 16 hostile
connections are open (silent, half an A-ASSOCIATE-RQ) and C-ECHO associations try to hold their
slots forever; a 7000 × 7000 16-bit DX is decoded within a bounded memory; a larger dataset is
cut while it arrives; a full ``--out`` answers 0xA700 and leaves nothing. Missing tools fail.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import threading
import time
from pathlib import Path

import cli
import numpy as np
import pydicom
import pytest
from cli import launch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedbridge_edge.listen import OUT_OF_RESOURCES, Listener
from fedbridge_edge.runtime import Predictor
from fedbridge_shared.processes import stop

DX = "1.2.840.10008.5.1.4.1.1.1.1"
DEADLINE = 120.0
MAX_PIXELS = 50_000_000
HALF_RQ = b"\x01\x00\x00\x00\x00\xcd\x00\x01\x00\x00FEDBRIDGE"  # type, length 205, then silence


@pytest.fixture(scope="module")
def cxr_image(cxr_root) -> Path:
    """A real chest X-ray."""
    return sorted((cxr_root / "COVID19").iterdir())[0]


def tool(name: str) -> str:
    import shutil

    found = shutil.which(name)
    assert found, f"{name} is missing: run `make system-packages` (dcmtk)"
    return found


wait_for = functools.partial(cli.wait_for, deadline=DEADLINE)


def dx(path: Path, pixels: np.ndarray, *, patient: str = "FB-0030") -> Path:
    """An original DX of ``pixels`` (uint8 or uint16)."""
    bits = pixels.dtype.itemsize * 8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientID, ds.PatientName, ds.Modality = patient, "Tester^Jane", "DX"
    ds.StudyDate, ds.StudyTime, ds.Manufacturer = "20261201", "101500", "ACME X-Ray"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def real_pixels(image: Path, size: tuple[int, int], bits: int = 8) -> np.ndarray:
    from PIL import Image

    grey = np.asarray(Image.open(image).convert("L").resize(size), dtype=np.uint16)
    return (grey * 257).astype(np.uint16) if bits == 16 else grey.astype(np.uint8)


def storescu(port: int, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("storescu"), "-aet", "MODALITY", "-aec", "FEDBRIDGE", "-to", "30", "-ta", "30",
         "-td", "30", "127.0.0.1", str(port), str(path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def hostile(port: int, source: str, payload: bytes) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    if payload:
        sock.sendall(payload)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def echo_holder(port: int, source: str, stop_event: threading.Event, ended: list) -> None:
    """An association sending a C-ECHO every second until the listener cuts it."""
    from pynetdicom import AE

    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="FEDBRIDGE", bind_address=(source, 0))
    if not assoc.is_established:
        ended.append("refused")
        return
    for _ in range(600):  # bounded
        if stop_event.is_set() or not assoc.is_established:
            break
        status = assoc.send_c_echo()
        if not status or not assoc.is_established:
            break
        time.sleep(1.0)
    ended.append("cut" if not assoc.is_established else "still open")
    if assoc.is_established:
        assoc.release()


def test_listener_serves_a_modality_through_hostile_connections_in_bounded_memory(
    edge_onnx, cxr_image, tmp_path
):
    tool("storescu")
    out, log = tmp_path / "out", tmp_path / "listen.log"
    proc = launch(
        "edge", "listen", edge_onnx, "--port", "0", "--out", out, "--timeout", "3",
        "--max-association-s", "40", "--max-per-peer", "4", "--max-associations", "16",
        "--max-pixels", str(MAX_PIXELS), "--threads", "1", log=log,
    )  # fmt: skip
    sockets: list[socket.socket] = []
    stop_echo = threading.Event()
    try:

        def address():
            assert proc.poll() is None, log.read_text()[-3000:]
            found = [x for x in log.read_text().splitlines() if "listening on 127.0.0.1:" in x]
            return found[-1] if found else None

        port = int(wait_for(address, "the listener").split("127.0.0.1:")[1].split()[0])
        # a first image, as a baseline for the memory measured below
        small = dx(tmp_path / "in" / "small.dcm", real_pixels(cxr_image, (512, 512)))
        assert storescu(port, small).returncode == 0, log.read_text()[-3000:]

        # 16 hostile connections: 8 silent, 8 with half an A-ASSOCIATE-RQ, from two addresses
        for i in range(16):
            source = "127.0.0.2" if i % 2 else "127.0.0.3"
            sockets.append(hostile(port, source, HALF_RQ if i % 2 else b""))
        # and 4 associations that C-ECHO every second to hold their slots forever
        ended: list[str] = []
        holders = [
            threading.Thread(target=echo_holder, args=(port, "127.0.0.4", stop_echo, ended))
            for _ in range(4)
        ]
        for t in holders:
            t.start()
        # the modality is served while all of that is open
        before = vm_hwm_mb(proc.pid)
        big = dx(tmp_path / "in" / "big.dcm", real_pixels(cxr_image, (7000, 7000), bits=16))
        sent = storescu(port, big)
        assert sent.returncode == 0, sent.stderr + log.read_text()[-3000:]
        grew = vm_hwm_mb(proc.pid) - before
        one_image_mb = MAX_PIXELS * 2 / 2**20  # 16-bit pixels at the limit
        print(f"\n[listen] 7000x7000 16-bit DX with 16 hostile connections open: VmHWM grew "
              f"{grew:.0f} MB (bound: 2 x {one_image_mb:.0f} MB)")  # fmt: skip
        assert grew < 2 * one_image_mb
        study = out / pydicom.dcmread(big, stop_before_pixels=True).StudyInstanceUID
        assert len(list(study.glob("*.json"))) == 1

        # every hostile connection is dropped (the timeout), every holder cut (the lifetime)
        wait_for(lambda: all(closed_by_peer(s) for s in sockets), "hostile connections dropped")
        for t in holders:
            t.join(DEADLINE)
        assert sorted(ended) == ["cut"] * 4, ended

        # a dataset over the byte limit is cut while it arrives: nothing of it is kept
        huge = dx(tmp_path / "in" / "huge.dcm", np.zeros((8000, 8000), np.uint16))
        assert storescu(port, huge).returncode != 0
        assert "while receiving" in log.read_text()
        huge.unlink()
        wait_for(lambda: not any((out / ".incoming").iterdir()), "the cut dataset removed")
        assert sorted(p.name for p in out.iterdir() if p.name != ".incoming") == sorted(
            [study.name, pydicom.dcmread(small, stop_before_pixels=True).StudyInstanceUID]
        )
        # and the listener still serves
        again = dx(tmp_path / "in" / "again.dcm", real_pixels(cxr_image, (512, 512)))
        assert storescu(port, again).returncode == 0
    finally:
        stop_echo.set()
        for s in sockets:
            s.close()
        stop([proc])
    assert "Traceback" not in log.read_text()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root mounts one), unmounted afterwards; failing to mount fails the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_out_answers_a700_and_keeps_nothing_of_the_store(
    edge_onnx, cxr_image, tmp_path, small_disk
):
    from pynetdicom import AE

    out = small_disk / "out"
    listener = Listener(Predictor(edge_onnx, threads=1), out=out)
    _, port = listener.start("127.0.0.1", 0)
    try:
        # 1.2 MB of pixels: the dataset arrives, its results do not fit
        ds = pydicom.dcmread(dx(tmp_path / "a.dcm", real_pixels(cxr_image, (1100, 1100))))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DX, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="FEDBRIDGE")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == OUT_OF_RESOURCES
    finally:
        listener.stop()
    left = [p for p in out.rglob("*") if p.is_file()]
    assert left == [], left
    assert not (out / ds.StudyInstanceUID).exists()
