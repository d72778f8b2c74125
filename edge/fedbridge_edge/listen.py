"""``fedbridge edge listen``: a DICOM C-STORE SCP that predicts every image it receives.

Only original acquisitions are diagnosed: CR and DX images (for presentation or processing),
whose SOP Class matches the presentation context, that are neither DERIVED nor SECONDARY and
were not made by fedbridge (its own Secondary Captures and reports sent back, say). Anything else
gets a failure status and one log line, and nothing is written or forwarded.

Each object is parsed once, from the bytes received, and predicted (one inference at a time).
Its files go under ``OUT/<StudyInstanceUID>/``: ``<SOPInstanceUID>.dcm`` (the input as received),
``.sc.dcm`` (the overlay as Secondary Capture), ``.sr.dcm`` (the Comprehensive SR),
``.overlay.png`` and, last, ``.json`` — each atomically and fsynced with its folder, folders 0700
and files 0600, so the modality's Success means the object is on disk. With a forward destination
the SC and SR then wait in a persistent outbox (:mod:`fedbridge_edge.outbox`) until the PACS has
them, across restarts; the modality never waits on the PACS. A second object with the same Study
and SOP Instance UID but another PatientID is refused, never written over the first. With a
retention the listener's own files of delivered results are deleted after that many days.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import time
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from fedbridge_edge import dicom_guard, dicom_out, laterality
from fedbridge_edge.dicom_guard import Bounds
from fedbridge_edge.errors import EdgeError
from fedbridge_edge.outbox import (
    FILE_MODE,
    Outbox,
    Unreachable,
    fsync_dir,
    private_dir,
    private_write,
)
from fedbridge_edge.runtime import Prediction, Predictor, write_prediction
from fedbridge_shared.data.images import dicom_to_grey
from fedbridge_shared.errors import FedbridgeError
from fedbridge_shared.label_codes import LabelCode

log = logging.getLogger("fedbridge.edge.listen")

# the acquisitions diagnosed; no Secondary Capture (fedbridge's own results are SCs)
STORAGE = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
UNCOMPRESSED = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]  # fmt: skip
SENT = (SecondaryCaptureImageStorage, ComprehensiveSRStorage)
# C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # cannot write the results
CANNOT_DECODE = 0xC210  # the dataset cannot be decoded
CANNOT_UNDERSTAND = 0xC000  # not an image fedbridge can read or predict
INTERNAL = 0xC001
NOT_ORIGINAL = 0xC002  # derived, secondary, or made by fedbridge: not diagnosed
CONFLICT = 0xC003  # this Study + SOP Instance UID was received for another patient
SOP_CLASS_MISMATCH = 0xA900  # Data Set does not match SOP Class
DEFAULT_TIMEOUT = 10.0
RESULT_SUFFIXES = (".dcm", ".sc.dcm", ".sr.dcm", ".overlay.png", ".json")  # what _store writes
SWEEP_EVERY = 3600.0  # seconds between retention sweeps
DEFAULT_MAX_PIXELS = 40_000_000  # rows × columns × frames, checked from the header
HEADER_SLACK = 16 << 20  # bytes of a dataset beyond its pixels (header, private tags)
DECODE_SIDE = 2048  # larger native images are subsampled while decoding (outputs are ≤ 2048)
INCOMING = ".incoming"  # datasets stream here while they arrive (under --out, private)


def max_dataset_bytes(max_pixels: int) -> int:
    """The bytes one dataset may take on the wire: 16-bit pixels at the limit plus a header."""
    return 2 * max_pixels + HEADER_SLACK


class Refused(EdgeError):
    """An object the listener will not diagnose, with the C-STORE status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes):
        return [str(value)]
    try:
        return [str(v) for v in value]
    except TypeError:
        return [str(value)]


def check_original(ds: Dataset, context: str, *, name: str) -> None:
    """Refuse (:class:`Refused`) anything but an original CR/DX acquisition: a SOP Class other
    than the presentation context's or outside :data:`STORAGE`, ImageType DERIVED or SECONDARY,
    or an object written by fedbridge (Manufacturer, Software Versions)."""
    accepted = {str(uid) for uid in STORAGE}
    sop = str(ds.get("SOPClassUID", "") or "")
    if str(context) not in accepted:
        raise Refused(f"{name}: presentation context {context} is not CR or DX image storage",
                      SOP_CLASS_MISMATCH)  # fmt: skip
    if sop != str(context):
        raise Refused(f"{name}: SOP Class UID {sop or '(none)'} does not match the presentation "
                      f"context {context}", SOP_CLASS_MISMATCH)  # fmt: skip
    kinds = [v.strip().upper() for v in _values(ds, "ImageType")]
    if {"DERIVED", "SECONDARY"} & set(kinds):
        shown = "\\".join(kinds)
        raise Refused(f"{name}: ImageType {shown} is not an original acquisition; "
                      "only ORIGINAL images are diagnosed", NOT_ORIGINAL)  # fmt: skip
    maker = " ".join(_values(ds, "Manufacturer")).strip().lower()
    software = [v.strip().lower() for v in _values(ds, "SoftwareVersions")]
    if maker == dicom_out.MANUFACTURER or any(v.startswith("fedbridge") for v in software):
        raise Refused(f"{name}: made by fedbridge (a result sent back), not an acquisition",
                      NOT_ORIGINAL)  # fmt: skip


def decodable_syntaxes() -> list[str]:
    """Uncompressed transfer syntaxes plus every compressed one pydicom can decode here."""
    from pydicom.pixels import get_decoder  # type: ignore[attr-defined]  # no __all__ there

    found: list[str] = list(UNCOMPRESSED)
    for uid in ALL_TRANSFER_SYNTAXES:
        if uid in found:
            continue
        try:
            if get_decoder(uid).is_available:
                found.append(uid)
        except NotImplementedError:
            continue
    return found


def check_ae_title(title: str, *, option: str) -> str:
    """An AE title: 1–16 printable ASCII characters, no backslash, not only spaces."""
    if not 1 <= len(title) <= 16 or not title.strip():
        raise EdgeError(f"{option} {title!r}: an AE title has 1 to 16 characters")
    if not title.isascii() or not title.isprintable() or "\\" in title:
        raise EdgeError(f"{option} {title!r}: printable ASCII only, no backslash")
    return title


@dataclass(frozen=True)
class Destination:
    """Where results are forwarded: a PACS's C-STORE SCP."""

    host: str
    port: int
    ae_title: str = "ANY-SCP"

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``HOST:PORT[:AET]`` (``--forward``)."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].isdigit():
            raise EdgeError(f"--forward {text!r}: expected HOST:PORT or HOST:PORT:AET")
        port = int(parts[1])
        if not 1 <= port <= 65535:
            raise EdgeError(f"--forward {text!r}: port must be in [1, 65535]")
        title = check_ae_title(parts[2], option="--forward") if len(parts) == 3 else "ANY-SCP"
        return cls(host=parts[0], port=port, ae_title=title)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.ae_title}"


def associate(dest: Destination, *, ae_title: str, timeout: float) -> Any:
    """An established association to ``dest`` for the result classes; Unreachable if none."""
    ae = AE(ae_title=ae_title)
    for sop in SENT:
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    except Exception as e:  # a name that does not resolve, say
        raise Unreachable(f"cannot connect to {dest} ({_line(e)})") from e
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "no association"
        raise Unreachable(f"{why} by {dest}")
    return assoc


def send(
    datasets: list[Dataset], dest: Destination, *, ae_title: str, timeout: float
) -> list[tuple[str, str | None]]:
    """C-STORE ``datasets`` to ``dest`` in one association: (SOPInstanceUID, error or None)."""
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        assoc = associate(dest, ae_title=ae_title, timeout=timeout)
    except Unreachable as e:
        return [(uid, str(e)) for uid in uids]
    return store_all(assoc, datasets)


def store_all(assoc: Any, datasets: list[Dataset]) -> list[tuple[str, str | None]]:
    """C-STORE each dataset on ``assoc``, then release it: (SOPInstanceUID, error or None)."""
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    results: list[tuple[str, str | None]] = []
    try:
        for ds, uid in zip(datasets, uids, strict=True):
            try:
                status = assoc.send_c_store(ds)
            except Exception as e:  # no accepted context for the SOP class, say
                results.append((uid, " ".join(str(e).split())))
                continue
            code = getattr(status, "Status", None)
            if code is None:
                results.append((uid, "no response (timeout or aborted)"))
            elif code in (0x0000, 0xB000, 0xB006, 0xB007):  # success or warning: stored
                results.append((uid, None))
            else:
                results.append((uid, f"status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


class Listener:
    """The SCP: check, predict (under a lock), write durably, queue for the PACS."""

    def __init__(
        self,
        predictor: Predictor,
        *,
        out: Path,
        ae_title: str = "FEDBRIDGE",
        forward: Destination | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retention_days: float | None = None,
        max_delay: float | None = None,
        status_every: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        bounds: Bounds | None = None,
    ) -> None:
        self.predictor, self.out = predictor, Path(out)
        self.ae_title = check_ae_title(ae_title, option="--ae-title")
        self.timeout = timeout
        self.max_pixels = max_pixels
        self.bounds = bounds or Bounds(timeout=timeout, max_bytes=max_dataset_bytes(max_pixels))
        self.decoding = threading.Semaphore(1)  # one decoded image in memory at a time
        self.incoming = self.out / INCOMING
        self.receiving: set[Path] = set()  # datasets whose handler runs now
        self.forward = forward
        self.retention_days = retention_days
        self.lock = threading.Lock()  # one inference at a time (TensorRT contexts)
        self.files_lock = threading.Lock()  # the same-patient check and the writes, together
        self.outbox: Outbox | None = None
        if forward is not None:
            options: dict[str, Any] = {}
            if max_delay is not None:
                options["max_delay"] = max_delay
            if status_every is not None:
                options["status_every"] = status_every
            self.outbox = Outbox(self.out, self.deliver, destination=str(forward), **options)
        self.server: Any = None
        self.stopping = threading.Event()
        self.sweeper: threading.Thread | None = None

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen (port 0: any free port); returns the bound address. The outbox's sender (what
        an earlier run left first) and the retention sweeps start too."""
        ae = AE(ae_title=self.ae_title)
        syntaxes = decodable_syntaxes()
        for sop in STORAGE:
            ae.add_supported_context(sop, syntaxes)
        ae.add_supported_context(Verification)
        # each dataset streams to a private file under --out while it arrives, never into memory
        shutil.rmtree(self.incoming, ignore_errors=True)  # what a killed run was receiving
        private_dir(self.incoming)
        self._saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET)
        tempfile.tempdir = str(self.incoming)  # where pynetdicom's NamedTemporaryFile writes
        _config.STORE_RECV_CHUNKED_DATASET = True
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_CONN_CLOSE, self._closed)]
        try:
            self.server = dicom_guard.start(ae, (host, port), bounds=self.bounds, handlers=handlers)
        except OSError as e:
            raise EdgeError(
                f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
            ) from e
        if self.outbox is not None:
            self.outbox.start()
        if self.retention_days is not None:
            self.sweeper = threading.Thread(
                target=self._sweep_loop, name="fedbridge-retention", daemon=True
            )
            self.sweeper.start()
        bound = self.server.server_address
        return str(bound[0]), int(bound[1])

    def stop(self) -> None:
        """End the server (open associations included) and the sender; what is not delivered
        yet stays in the outbox for the next start."""
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None
            tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET = self._saved
            with contextlib.suppress(OSError):
                self.incoming.rmdir()  # only when empty
        if self.outbox is not None:
            self.outbox.close(timeout=3 * self.timeout)
        if self.sweeper is not None:
            self.sweeper.join(self.timeout)

    def handle_store(self, event: Any) -> int:
        """EVT_C_STORE: a status for the modality; never raises. The dataset arrived as a file
        (``event.dataset_path``); nothing of a refused or failed store stays under --out."""
        sock = dicom_guard.guarded(event.assoc)
        if sock is not None:
            sock.received = 0  # the next dataset's bytes count from here
        try:
            path = Path(event.dataset_path)
        except Exception as e:
            log.error("refused a dataset: cannot read it (%s)", _line(e))
            return CANNOT_DECODE
        self.receiving.add(path)
        try:
            return self._handle(path, event)
        finally:
            self.receiving.discard(path)
            # the time spent here (decode, inference) is not the peer's silence: restart
            # pynetdicom's network idle timer, or a slow image aborts the modality's release
            timer = getattr(getattr(event.assoc, "dul", None), "_idle_timer", None)
            if timer is not None:
                timer.restart()

    def _handle(self, path: Path, event: Any) -> int:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            context = str(event.context.abstract_syntax)
            name = f"{event.assoc.requestor.ae_title}:{header.get('SOPInstanceUID', '?')}"
        except Exception as e:
            log.error("refused a dataset: cannot decode it (%s)", _line(e))
            return CANNOT_DECODE
        try:
            self._store(path, header, context, name)
        except Refused as e:
            log.error("refused %s", _line(e))
            return e.status
        except FedbridgeError as e:
            log.error("refused %s", _line(e))
            return CANNOT_UNDERSTAND
        except OSError as e:
            log.error("refused %s: cannot write results in %s (%s)", name, self.out, _line(e))
            return OUT_OF_RESOURCES
        except MemoryError:
            log.error("refused %s: out of memory while decoding it", name)
            return OUT_OF_RESOURCES
        except Exception as e:  # a bug must not cost the modality its reply
            log.error("refused %s: internal error (%s: %s)", name, type(e).__name__, _line(e))
            return INTERNAL
        return SUCCESS

    def _closed(self, event: Any) -> None:
        """EVT_CONN_CLOSE: remove what an association cut while receiving left in .incoming:
        its dataset in progress, and anything stale."""
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is not None:
            with contextlib.suppress(OSError, AttributeError):
                partial.close()
                if Path(partial.name) not in self.receiving:
                    Path(partial.name).unlink()
        cutoff = time.time() - 2 * self.bounds.timeout
        with contextlib.suppress(OSError):
            for stale in self.incoming.iterdir():
                with contextlib.suppress(OSError):
                    if stale not in self.receiving and stale.stat().st_mtime < cutoff:
                        stale.unlink()

    def check_pixels(self, header: Dataset, name: str) -> None:
        """Refuse an image over --max-pixels from its header, before decoding anything."""
        try:
            rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
            frames = int(header.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError) as e:
            raise Refused(f"{name}: unreadable Rows/Columns/NumberOfFrames ({_line(e)})",
                          CANNOT_UNDERSTAND) from e  # fmt: skip
        if rows * cols * max(frames, 1) > self.max_pixels:
            raise Refused(f"{name}: {cols}x{rows} px × {frames} frame(s) is over the "
                          f"{self.max_pixels:,} pixel limit (--max-pixels); not decoded",
                          CANNOT_UNDERSTAND)  # fmt: skip

    def decode(self, path: Path, name: str) -> tuple[Any, Dataset]:
        """The greyscale image of the dataset at ``path`` (and the dataset), under the
        one-decode budget."""
        with self.decoding:
            ds = pydicom.dcmread(path)
            return lean_grey(ds, name), ds

    def _store(self, path: Path, header: Dataset, context: str, name: str) -> None:
        check_original(header, context, name=name)
        dicom_out.check_source(header, name=name)
        self.check_pixels(header, name)
        grey, ds = self.decode(path, name)
        del ds.PixelData  # the decoded image is all that is needed from here
        markers = laterality.markers_from_dataset(ds)
        with self.lock:
            pred = self.predictor.predict_array(grey, name, markers=markers)
        sc, sr = results(pred, ds, codes=self.predictor.codes, name=name)
        sc_bytes, sr_bytes = dicom_out.encode(sc), dicom_out.encode(sr)
        study, stem = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        folder = self.out / study
        names = [folder / f"{stem}{suffix}" for suffix in RESULT_SUFFIXES]
        with self.files_lock:
            self._check_same_patient(folder / f"{stem}.dcm", ds, name)
            try:
                private_dir(folder)
                os.chmod(path, FILE_MODE)
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(path, folder / f"{stem}.dcm")  # the input as received, durable first
                sc_path = private_write(folder / f"{stem}.sc.dcm", sc_bytes)
                sr_path = private_write(folder / f"{stem}.sr.dcm", sr_bytes)
                for written in write_prediction(pred, folder, stem)[::-1]:  # the JSON last
                    os.chmod(written, FILE_MODE)
                fsync_dir(folder)
                if self.outbox is not None:
                    self.outbox.put(Outbox.key(study, stem), [sc_path, sr_path], name)
            except OSError:  # a full disk, say: none of this object's files stay
                for done in names:
                    with contextlib.suppress(OSError):
                        done.unlink()
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
                raise
        log.info("%s: %s", name, pred.record.summary())

    @staticmethod
    def _check_same_patient(previous: Path, ds: Dataset, name: str) -> None:
        """A resend of the same object replaces its results; another patient's object with the
        same UIDs is refused, so nobody's results are silently written over."""
        if not previous.is_file():
            return
        try:
            old = pydicom.dcmread(previous, stop_before_pixels=True, specific_tags=["PatientID"])
            old_id = str(old.get("PatientID", "") or "")
        except Exception as e:
            raise Refused(f"{name}: an earlier object with these UIDs is unreadable ({_line(e)})",
                          CONFLICT) from e  # fmt: skip
        new_id = str(ds.get("PatientID", "") or "")
        if old_id != new_id:
            raise Refused(
                f"{name}: Study {ds.StudyInstanceUID} SOP Instance {ds.SOPInstanceUID} was "
                "already received for another PatientID; kept the first, refused this one",
                CONFLICT,
            )

    def deliver(self, paths: list[Path]) -> list[str | None]:
        """The outbox's send: C-STORE the result files at ``paths`` to the PACS, one association;
        an error (or None) per file. Unreachable when there is no association at all."""
        assert self.forward is not None
        datasets: list[Dataset | None] = []
        errors: list[str | None] = []
        for path in paths:
            try:
                datasets.append(pydicom.dcmread(path))
                errors.append(None)
            except Exception as e:  # gone (a person deleted it) or damaged: say so, skip it
                datasets.append(None)
                errors.append(f"cannot read {path.name} ({_line(e)})")
                log.error("forward %s to %s impossible: %s", path.name, self.forward, errors[-1])
        readable = [d for d in datasets if d is not None]
        if readable:
            assoc = associate(self.forward, ae_title=self.ae_title, timeout=self.timeout)
            outcome = iter(store_all(assoc, readable))
            for i, d in enumerate(datasets):
                if d is None:
                    continue
                uid, error = next(outcome)
                errors[i] = error
                if error is None:
                    log.info("forwarded %s to %s", uid, self.forward)
                else:
                    log.error("forward %s to %s failed: %s", uid, self.forward, error)
        # a file that cannot be read will never be sent: not a reason to retry forever
        return [e if e is None or not e.startswith("cannot read") else None for e in errors]

    def sweep(self, now: float | None = None) -> int:
        """Delete the listener's own files of results older than the retention and delivered
        (no pending send); a study folder left empty goes too. Returns the results removed."""
        if self.retention_days is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        pending = self.outbox.pending_files() if self.outbox is not None else set()
        removed = 0
        for folder in self.out.iterdir():
            if not folder.is_dir() or not dicom_out.UID_PATTERN.match(folder.name):
                continue
            for record in folder.glob("*.json"):
                stem = record.name[: -len(".json")]
                if not dicom_out.UID_PATTERN.match(stem):
                    continue
                with self.files_lock:
                    try:
                        if record.stat().st_mtime >= cutoff:
                            continue
                    except FileNotFoundError:
                        continue
                    names = [f"{stem}{suffix}" for suffix in RESULT_SUFFIXES]
                    if any(f"{folder.name}/{n}" in pending for n in names):
                        continue  # not delivered yet
                    for n in names[:-1]:
                        (folder / n).unlink(missing_ok=True)
                    record.unlink(missing_ok=True)  # the completion mark, last
                    removed += 1
            with self.files_lock, contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: other people's files stay
        if removed:
            log.info("retention: removed %d result sets older than %g days", removed,
                     self.retention_days)  # fmt: skip
        return removed

    def _sweep_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sweep()
            except Exception as e:  # a sweep must never end the listener
                log.error("retention sweep: %s: %s", type(e).__name__, _line(e))
            self.stopping.wait(SWEEP_EVERY)


def lean_grey(ds: Dataset, name: str, side: int = DECODE_SIDE) -> Any:
    """``dicom_to_grey`` of ``ds``; a native (uncompressed) single-frame monochrome image larger
    than ``side`` is subsampled by a whole step from its pixel bytes first (no copy of the full
    image: the pixel transforms are per pixel, the outputs at most 2048 px), so a 7000 × 7000
    16-bit DX costs its bytes once, not five float64 copies."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    native = syntax is not None and not syntax.is_compressed and not syntax.is_deflated
    plain = (
        int(ds.get("SamplesPerPixel", 1) or 1) == 1
        and int(ds.get("NumberOfFrames", 1) or 1) == 1
        and bits in (8, 16)
        and str(ds.get("PhotometricInterpretation", "")).upper() in ("MONOCHROME1", "MONOCHROME2")
    )
    if not (native and plain and max(rows, cols) > side and "PixelData" in ds):
        return dicom_to_grey(ds, name)
    assert syntax is not None  # native implies it
    import numpy as np

    raw = ds.PixelData
    if len(raw) < rows * cols * bits // 8:
        return dicom_to_grey(ds, name)  # the decoder names what is wrong
    step = math.ceil(max(rows, cols) / side)
    kind = "i" if int(ds.get("PixelRepresentation", 0) or 0) else "u"
    order = "<" if syntax.is_little_endian else ">"
    pixels = np.frombuffer(raw, dtype=f"{order}{kind}{bits // 8}", count=rows * cols)
    small = pixels.reshape(rows, cols)[::step, ::step].astype(f"<{kind}{bits // 8}")
    del raw, pixels
    ds.PixelData = small.tobytes()
    ds.Rows, ds.Columns = small.shape
    if order == ">":
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dicom_to_grey(ds, name)


def results(
    pred: Prediction, source: Dataset, *, codes: dict[str, LabelCode], name: str
) -> tuple[Dataset, Dataset]:
    """(Secondary Capture, SR) of one prediction: the listener's one call into dicom_out."""
    png = pred.overlay_png(max_side=dicom_out.SC_MAX_SIDE)
    return dicom_out.build(pred.record, png, source, codes=codes, name=name)


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
