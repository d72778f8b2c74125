"""``fedbridge edge listen``: a DICOM C-STORE SCP that predicts every image it receives.

Each received CR, DX or Secondary Capture image is predicted (one inference at a time) and its
results are written under ``OUT/<StudyInstanceUID>/``: ``<SOPInstanceUID>.dcm`` (the input as
received), ``.sc.dcm`` (the overlay as Secondary Capture), ``.sr.dcm`` (the Comprehensive SR),
``.overlay.png`` and, last, ``.json`` — each file atomically, so a present JSON means a complete
set. With a forward destination the SC and SR then go to a PACS by C-STORE from a background
thread, so the modality's reply never waits on the PACS; every send is bounded by timeouts and
logged per instance. An image that cannot be read or predicted gets a failure status and one log
line; the listener keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)

from fedbridge_edge import _legacy_record, dicom_out
from fedbridge_edge.errors import EdgeError
from fedbridge_edge.preprocess import decode_bytes
from fedbridge_edge.runtime import Predictor, write_prediction
from fedbridge_shared.errors import FedbridgeError
from fedbridge_shared.files import atomic_write

log = logging.getLogger("fedbridge.edge.listen")

STORAGE = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
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
DEFAULT_TIMEOUT = 10.0
QUEUE_SIZE = 256


def decodable_syntaxes() -> list[str]:
    """Uncompressed transfer syntaxes plus every compressed one pydicom can decode here."""
    from pydicom.pixels import get_decoder

    found = list(UNCOMPRESSED)
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


def send(
    datasets: list[Dataset], dest: Destination, *, ae_title: str, timeout: float
) -> list[tuple[str, str | None]]:
    """C-STORE ``datasets`` to ``dest`` in one association: (SOPInstanceUID, error or None)."""
    ae = AE(ae_title=ae_title)
    for sop in SENT:
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    except Exception as e:  # a name that does not resolve, say
        return [(uid, f"cannot connect ({e})") for uid in uids]
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "no association"
        return [(uid, f"{why} by {dest}") for uid in uids]
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


class Forwarder:
    """One background thread sending each result pair to the PACS, in arrival order."""

    def __init__(self, dest: Destination, *, ae_title: str, timeout: float) -> None:
        self.dest, self.ae_title, self.timeout = dest, ae_title, timeout
        self.jobs: queue.Queue[list[Dataset] | None] = queue.Queue(QUEUE_SIZE)
        self.thread = threading.Thread(target=self._run, name="fedbridge-forward", daemon=True)
        self.thread.start()

    def put(self, datasets: list[Dataset], name: str) -> None:
        try:
            self.jobs.put_nowait(datasets)
        except queue.Full:
            log.error("forward %s to %s: skipped, %d sends waiting", name, self.dest, QUEUE_SIZE)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                results = send(job, self.dest, ae_title=self.ae_title, timeout=self.timeout)
            except Exception as e:  # never let one send end the thread
                results = [(str(ds.SOPInstanceUID), f"{type(e).__name__}: {e}") for ds in job]
            for uid, error in results:
                if error is None:
                    log.info("forwarded %s to %s", uid, self.dest)
                else:
                    log.error("forward %s to %s failed: %s", uid, self.dest, error)

    def close(self, timeout: float) -> None:
        """Send what is queued (within ``timeout`` seconds), then stop the thread."""
        with contextlib.suppress(queue.Full):
            self.jobs.put(None, timeout=timeout)
        self.thread.join(timeout)


class Listener:
    """The SCP: receive, predict (under a lock), write, forward."""

    def __init__(
        self,
        predictor: Predictor,
        *,
        out: Path,
        ae_title: str = "FEDBRIDGE",
        forward: Destination | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.predictor, self.out = predictor, Path(out)
        self.ae_title = check_ae_title(ae_title, option="--ae-title")
        self.timeout = timeout
        self.model = _legacy_record.model_identity(predictor)  # until runtime carries .record
        self.codes = _legacy_record.codes_of(predictor)
        self.lock = threading.Lock()  # one inference at a time (TensorRT contexts)
        self.forwarder = (
            Forwarder(forward, ae_title=self.ae_title, timeout=timeout) if forward else None
        )
        self.server: Any = None

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen (port 0: any free port); returns the bound address."""
        ae = AE(ae_title=self.ae_title)
        syntaxes = decodable_syntaxes()
        for sop in STORAGE:
            ae.add_supported_context(sop, syntaxes)
        ae.add_supported_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.maximum_associations = 8
        try:
            self.server = ae.start_server(
                (host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.handle_store)]
            )
        except OSError as e:
            raise EdgeError(
                f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
            ) from e
        bound = self.server.server_address
        return str(bound[0]), int(bound[1])

    def stop(self) -> None:
        """End the server (open associations included), then finish the forwards queued."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.forwarder is not None:
            self.forwarder.close(timeout=3 * self.timeout)

    def handle_store(self, event: Any) -> int:
        """EVT_C_STORE: a status for the modality; never raises."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            name = f"{event.assoc.requestor.ae_title}:{ds.get('SOPInstanceUID', '?')}"
            data = dicom_out.encode(ds)
        except Exception as e:
            log.error("refused a dataset: cannot decode it (%s)", _line(e))
            return CANNOT_DECODE
        try:
            self._store(ds, data, name)
        except FedbridgeError as e:
            log.error("refused %s", _line(e))
            return CANNOT_UNDERSTAND
        except OSError as e:
            log.error("refused %s: cannot write results in %s (%s)", name, self.out, _line(e))
            return OUT_OF_RESOURCES
        except Exception as e:  # a bug must not cost the modality its reply
            log.error("refused %s: internal error (%s: %s)", name, type(e).__name__, _line(e))
            return INTERNAL
        return SUCCESS

    def _store(self, ds: Dataset, data: bytes, name: str) -> None:
        dicom_out.check_source(ds, name=name)
        grey = decode_bytes(data, name)
        with self.lock:
            pred = self.predictor.predict_array(grey, name)
        record = _legacy_record.record_of(pred, self.model)  # until runtime carries .record
        sc, sr = dicom_out.build(record, pred.overlay_png(), ds, codes=self.codes, name=name)
        folder = self.out / str(ds.StudyInstanceUID)
        stem = str(ds.SOPInstanceUID)
        atomic_write(folder / f"{stem}.dcm", data)
        dicom_out.write(sc, sr, folder, stem)
        write_prediction(pred, folder, stem)  # the JSON last: its presence means complete
        log.info("%s: %s", name, record.summary())
        if self.forwarder is not None:
            self.forwarder.put([sc, sr], name)


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
