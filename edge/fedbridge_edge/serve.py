"""``fedbridge edge serve``: the bedside HTTP API (Starlette on uvicorn, no torch).

Endpoints (``GET /openapi.json`` describes them):

- ``POST /predict``: the image (PNG, JPEG or DICOM) as the raw body (``?name=`` names it in the
  reply, else ``"upload"``) or as ``multipart/form-data`` field ``file`` (its filename names it).
  ``?overlay=none`` (default) | ``png`` (adds ``overlay_png_base64``) | ``dicom`` (a DICOM
  Secondary Capture, when ``fedbridge_edge.dicom_out`` provides one, else 400).
- ``POST /predict/batch``: multipart with up to ``max_files`` files → a JSON list, one entry per
  file; a file that cannot be read gets ``{"image", "error"}`` without failing the others.
- ``GET /health`` (model, labels, backend, version) and ``GET /ready`` (503 until warmed up).
- The Open Inference Protocol (KServe v2) beside them: ``GET /v2``, ``/v2/health/live``,
  ``/v2/health/ready``, ``/v2/models/{name}``, ``/v2/models/{name}/ready``; ``POST
  /v2/models/{name}/infer`` (input ``image``: BYTES of base64 image files, or UINT8 pixels).
- ``GET /metrics``: Prometheus counters and histograms (prometheus-client).

Every JSON body is a pydantic model (``fedbridge_edge.api_models``, the prediction record of
``fedbridge_edge.record``), and ``/openapi.json`` is generated from those models. Each reply
carries ``X-Request-ID`` (the client's, when it sent a sane one, else a new one); a DICOM
upload's reply echoes its Study and SOP Instance UIDs.

Every error is JSON ``{"error": "..."}``: 404 unknown path, 405 (with ``Allow``) wrong method,
408 body too slow, 413 body too large, 415 content type, 400 unreadable image or a declared
pixel count over the limit (checked before decoding), 503 over the concurrency limit.
Bounds: body size (declared or streamed, chunked included), header and body timeouts, a 2048
listen backlog, requests in flight, one inference at a time (TensorRT contexts are not
thread-safe) in a worker thread so ``/health`` keeps answering.
Bind to 127.0.0.1 (the default) and put an authenticating proxy in front for anything wider.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import h11
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedbridge_edge.api_models import (
    Health,
    InferRequest,
    InferResponse,
    ModelMetadata,
    PredictReply,
    Ready,
    ResponseOutput,
    ServerMetadata,
    TensorMetadata,
    component_schemas,
    ref,
)
from fedbridge_edge.errors import EdgeError
from fedbridge_edge.preprocess import DecodedImage, decode_upload
from fedbridge_edge.record import ApiErrorBody, FileError
from fedbridge_edge.runtime import Prediction, Predictor
from fedbridge_shared import __version__
from fedbridge_shared.errors import FedbridgeError

log = logging.getLogger("fedbridge.edge")

DEFAULT_MAX_BYTES = 32 << 20
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_CONCURRENCY = 128
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_FILES = 16
BACKLOG = 2048
MAX_HEADER_BYTES = 16 << 10
MAX_NAME = 1024  # characters of an upload's file name
OVERLAYS = ("none", "png", "dicom")
RAW_TYPES = (
    "",
    "application/octet-stream",
    "application/dicom",
    "application/x-www-form-urlencoded",  # curl --data-binary and urllib send this by default
)

Scope = dict[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    """The server's bounds (each one a ``fedbridge edge serve`` option)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    concurrency: int = DEFAULT_CONCURRENCY
    timeout: float = DEFAULT_TIMEOUT
    max_files: int = DEFAULT_MAX_FILES


class ApiError(Exception):
    """An HTTP error with a JSON ``{"error": ...}`` body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def version() -> str:
    """fedbridge's version (``fedbridge_shared.__version__``, the installed distribution's)."""
    return __version__


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status in (408, 413):  # the rest of the body may be unread: do not reuse the connection
        headers.setdefault("Connection", "close")
    return JSONResponse(
        ApiErrorBody(error=message).model_dump(), status_code=status, headers=headers
    )


# ---- ASGI middleware: body bounds, admission, access log ------------------------------------

REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID = 128


def request_id_of(given: bytes | None) -> str:
    """The client's X-Request-ID when it is 1–128 printable ASCII characters, else a new one."""
    if given:
        text = given.decode("latin-1")
        if len(text) <= MAX_REQUEST_ID and text.isascii() and text.isprintable():
            return text
    return uuid.uuid4().hex


def escape_log(text: str) -> str:
    """A request path or query as one log line: control characters escaped, never raw."""
    return "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode() for c in text
    )


class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps never clash)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.predictions = Counter(
            "fedbridge_predictions", "Images assessed, by status", ["status"],
            registry=self.registry,
        )  # fmt: skip
        self.responses = Counter(
            "fedbridge_http_responses", "HTTP responses, by status code", ["code"],
            registry=self.registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "fedbridge_request_seconds", "Wall time per HTTP request", registry=self.registry
        )
        self.inference_seconds = Histogram(
            "fedbridge_inference_seconds", "Model run time per image", registry=self.registry
        )
        self.ready = Gauge(
            "fedbridge_ready", "1 once the model is warmed up", registry=self.registry
        )

    def observe(self, pred: Prediction) -> None:
        self.predictions.labels(status=pred.record.status.value).inc()
        self.inference_seconds.observe(pred.record.inference_ms / 1e3)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Bounds:
    """Declared and streamed body size, body deadline, requests in flight, access log."""

    def __init__(self, app: Any, limits: Limits, metrics: Metrics | None = None) -> None:
        self.app, self.limits, self.in_flight, self.metrics = app, limits, 0, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, sent = time.perf_counter(), 0, 0
        request_id = request_id_of(dict(scope["headers"]).get(REQUEST_ID_HEADER))
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_logged(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER
                ]
                message = {
                    **message,
                    "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode())],
                }
                if self.metrics is not None:
                    self.metrics.responses.labels(code=str(status)).inc()
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self._handle(scope, receive, send_logged)
        finally:
            path = scope["path"] + (
                f"?{scope['query_string'].decode('latin-1')}" if scope["query_string"] else ""
            )
            host_port = scope.get("client")
            client = f"{host_port[0]}:{host_port[1]}" if host_port else "-"
            seconds = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.request_seconds.observe(seconds)
            log.info(
                '%s "%s %s" %s %d B %.1f ms id=%s',
                client, scope["method"], escape_log(path), status or "-", sent, seconds * 1e3,
                request_id,
            )  # fmt: skip

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits = self.limits
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and int(declared) > limits.max_bytes:  # h11 checked the digits
            return await _error(
                413, f"body of {int(declared)} bytes exceeds the {limits.max_bytes} limit"
            )(scope, receive, send)
        admitted = scope["method"] == "POST"
        if admitted and self.in_flight >= limits.concurrency:
            return await _error(
                503,
                f"busy: {limits.concurrency} requests in flight (--concurrency); retry shortly",
                {"Retry-After": "1"},
            )(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline, seen, done = loop.time() + limits.timeout, 0, False

        async def bounded() -> Message:
            nonlocal seen, done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                raise ApiError(408, f"body not received within {limits.timeout:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limits.max_bytes:
                    raise ApiError(413, f"body exceeds the {limits.max_bytes} bytes limit")
                done = not message.get("more_body", False)
            return message

        self.in_flight += admitted
        try:
            await self.app(scope, bounded, send)
        finally:
            self.in_flight -= admitted


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and JSON for malformed requests."""

    header_timeout = DEFAULT_TIMEOUT
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the headers are in: the body deadline is the app's
        else:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._reader_arrived()
        super().connection_lost(exc)

    # a send timeout: a client that stops reading a reply is cut, its buffered reply dropped
    _send_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.header_timeout, self._slow_reader)

    def resume_writing(self) -> None:
        self._reader_arrived()
        super().resume_writing()

    def _reader_arrived(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _slow_reader(self) -> None:
        self._send_timer = None
        log.info("cut a client that read nothing of its reply for %g s (--timeout)",
                 self.header_timeout)  # fmt: skip
        self.transport.abort()  # frees the unsent reply now

    def _arm(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": f"malformed HTTP request ({msg.rstrip('.')})"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body)):
            self.transport.write(self.conn.send(event))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


# ---- the application ------------------------------------------------------------------------


class Api:
    """The endpoints over one Predictor."""

    def __init__(self, predictor: Predictor, limits: Limits, metrics: Metrics) -> None:
        self.predictor, self.limits, self.metrics = predictor, limits, metrics
        self.ready = False
        self.infer_lock = threading.Lock()  # one inference at a time (TensorRT contexts)
        self.decoders = threading.BoundedSemaphore(2)
        self.model_name = predictor.identity.name

    def warm_up(self) -> None:
        size = self.predictor.spec.image_size
        with self.infer_lock:
            self.predictor.predict_array(np.zeros((size, size), np.uint8), "warm-up")
        self.ready = True
        self.metrics.ready.set(1)

    async def health(self, request: Request) -> Response:
        p = self.predictor
        return _json(
            Health(
                status="ok", ready=self.ready, model_sha256=p.sha256, labels=list(p.labels),
                modality=p.identity.modality, calibrated=p.identity.calibrated,
                backend=p.backend, version=version(), max_bytes=self.limits.max_bytes,
                max_pixels=self.limits.max_pixels,
            )
        )  # fmt: skip

    async def ready_check(self, request: Request) -> Response:
        if not self.ready:
            return _error(503, "model warming up", {"Retry-After": "1"})
        return _json(Ready(status="ready"))

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_schema(self.limits))

    async def prometheus(self, request: Request) -> Response:
        body, media_type = self.metrics.exposition()
        return Response(body, media_type=media_type)

    def _overlay(self, request: Request) -> str:
        overlay = request.query_params.get("overlay", "none")
        if overlay not in OVERLAYS:
            raise ApiError(400, f"?overlay={overlay}: must be one of {', '.join(OVERLAYS)}")
        return overlay

    async def _files(self, request: Request) -> list[tuple[str, bytes]]:
        """(name, bytes) of each upload: multipart file parts, or the raw body."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(
                    max_files=self.limits.max_files, max_fields=self.limits.max_files
                )
            except HTTPException as e:  # starlette's multipart refusals
                raise ApiError(400, f"multipart body refused: {e.detail}") from e
            except (ApiError, ClientDisconnect):
                raise
            except Exception as e:  # noqa: BLE001 - a malformed part (no headers, say): 400
                raise ApiError(400, f"malformed multipart body ({type(e).__name__})") from None
            files = []
            for _, value in form.multi_items():
                if not isinstance(value, str):  # an UploadFile
                    name = value.filename or "upload"
                    if len(name) > MAX_NAME:
                        raise ApiError(400, f"a file name of {len(name)} characters; at most "
                                       f"{MAX_NAME}")  # fmt: skip
                    files.append((name, await value.read()))
                    await value.close()
            if not files:
                raise ApiError(400, "multipart body has no file part (send field 'file')")
            return files
        if ctype in RAW_TYPES or ctype.startswith("image/"):
            body = await request.body()
            if not body:
                raise ApiError(400, "empty body: POST the image bytes (or multipart field 'file')")
            return [(request.query_params.get("name", "upload"), body)]
        raise ApiError(
            415,
            f"content type {ctype!r} not supported: send image bytes (image/*, "
            "application/dicom, application/octet-stream) or multipart/form-data",
        )

    async def _predict_one(self, name: str, data: bytes, overlay: str) -> PredictReply:
        """Decode, infer and render in one worker thread (the event loop stays free)."""
        return await run_in_threadpool(self._predict_sync, name, data, overlay)

    def _predict_sync(self, name: str, data: bytes, overlay: str) -> PredictReply:
        started = time.perf_counter()
        pred = self._infer(self._decode(data, name), name, started)
        return self._render(pred, overlay)

    def _decode(self, data: bytes, name: str) -> DecodedImage:
        """Decode an upload once (a DICOM parsed once, its size checked before its pixels)."""
        with self.decoders:  # decoded images in memory at once, bounded
            return decode_upload(data, name, max_pixels=self.limits.max_pixels)

    def _infer(self, image: DecodedImage, name: str, started: float) -> Prediction:
        with self.infer_lock:
            pred = self.predictor.predict_image(image, name, started)
        self.metrics.observe(pred)
        return pred

    def _render(self, pred: Prediction, overlay: str) -> PredictReply:
        extra: dict[str, Any] = {}
        header = pred.dicom
        if header is not None:
            extra["study_instance_uid"] = str(header.get("StudyInstanceUID", "")) or None
            extra["sop_instance_uid"] = str(header.get("SOPInstanceUID", "")) or None
        if overlay == "png":
            extra["overlay_png_base64"] = base64.b64encode(pred.overlay_png()).decode()
        elif overlay == "dicom":  # the Secondary Capture and the SR, in the upload's study
            from fedbridge_edge import dicom_out

            if header is None:
                raise ApiError(
                    400, f"{pred.image}: ?overlay=dicom needs a DICOM upload (its patient and "
                    "study go into the results); use ?overlay=png"
                )  # fmt: skip
            sc, sr = dicom_out.build(
                pred.record, pred.overlay_png(max_side=dicom_out.SC_MAX_SIDE), header,
                codes=self.predictor.codes, name=pred.image,
            )  # fmt: skip
            extra["overlay_dicom_base64"] = base64.b64encode(dicom_out.encode(sc)).decode()
            extra["report_dicom_base64"] = base64.b64encode(dicom_out.encode(sr)).decode()
        return PredictReply(**dict(pred.record), **extra)

    async def predict(self, request: Request) -> Response:
        overlay = self._overlay(request)
        files = await self._files(request)
        if len(files) > 1:
            raise ApiError(400, f"{len(files)} files sent: /predict takes one (/predict/batch)")
        name, data = files[0]
        try:
            return _json(await self._predict_one(name, data, overlay))
        except FedbridgeError as e:  # ImageTooLarge (over --max-pixels) included
            raise ApiError(400, str(e)) from e

    async def predict_batch(self, request: Request) -> Response:
        overlay = self._overlay(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise ApiError(415, f"content type {ctype!r}: /predict/batch takes multipart/form-data")
        results: list[dict[str, Any]] = []
        for name, data in await self._files(request):
            try:
                results.append(_dump(await self._predict_one(name, data, overlay)))
            except FedbridgeError as e:
                results.append(_dump(FileError(image=name, error=str(e))))
        return JSONResponse(results)

    # ---- Open Inference Protocol (KServe v2) ----------------------------------------------

    async def v2_server(self, request: Request) -> Response:
        return _json(ServerMetadata(name="fedbridge", version=version(), extensions=[]))

    async def v2_live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def v2_ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    def _model(self, request: Request) -> None:
        name = request.path_params["name"]
        if name != self.model_name:
            raise ApiError(404, f"no model {name!r} here (this server has {self.model_name!r})")

    async def v2_model(self, request: Request) -> Response:
        self._model(request)
        p = self.predictor
        k = len(p.labels)
        return _json(
            ModelMetadata(
                name=self.model_name, versions=[p.sha256], platform=f"fedbridge_{p.backend}",
                inputs=[TensorMetadata(name="image", datatype="BYTES", shape=[-1])],
                outputs=[
                    TensorMetadata(name="status", datatype="BYTES", shape=[-1]),
                    TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
                    TensorMetadata(name="scores", datatype="FP32", shape=[-1, k]),
                    TensorMetadata(name="record", datatype="BYTES", shape=[-1]),
                ],
                parameters={"labels": list(p.labels), "modality": p.identity.modality,
                            "score_kind": "probability" if p.identity.calibrated else "score"},
            )
        )  # fmt: skip

    async def v2_model_ready(self, request: Request) -> Response:
        self._model(request)
        return JSONResponse(
            {"name": self.model_name, "ready": self.ready}, status_code=200 if self.ready else 503
        )

    async def v2_infer(self, request: Request) -> Response:
        self._model(request)
        body = await request.body()
        try:
            infer = InferRequest.model_validate_json(body)
        except ValueError as e:
            first = str(e).splitlines()
            raise ApiError(400, f"not an inference request: {' '.join(first[:3])}") from None
        if len(infer.inputs) != 1 or infer.inputs[0].name != "image":
            raise ApiError(400, "inference request: send exactly one input named 'image'")
        images = self._v2_images(infer.inputs[0])
        preds: list[Prediction] = []
        for i, (name, item) in enumerate(images):
            try:
                preds.append(await run_in_threadpool(self._v2_predict, name, item))
            except FedbridgeError as e:
                raise ApiError(400, f"image {i}: {e}") from e
        return _json(self._v2_response(infer, preds))

    def _v2_images(self, tensor: Any) -> list[tuple[str, bytes | np.ndarray]]:
        n_max = self.limits.max_files
        if tensor.datatype == "BYTES":
            if len(tensor.shape) != 1 or tensor.shape[0] != len(tensor.data):
                raise ApiError(400, "input 'image' BYTES: shape must be [N] with N data items")
            if not 1 <= len(tensor.data) <= n_max:
                raise ApiError(400, f"input 'image': 1 to {n_max} images per request")
            out: list[tuple[str, bytes | np.ndarray]] = []
            for i, item in enumerate(tensor.data):
                try:
                    out.append((f"image-{i}", base64.b64decode(str(item), validate=True)))
                except (binascii.Error, ValueError):
                    raise ApiError(400, f"input 'image' item {i}: not base64") from None
            return out
        if tensor.datatype == "UINT8":
            shape = (
                tensor.shape[1:]
                if len(tensor.shape) == 3 and tensor.shape[0] == 1
                else tensor.shape
            )
            if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape):
                raise ApiError(400, "input 'image' UINT8: shape [H, W] or [1, H, W] (greyscale)")
            if shape[0] * shape[1] > self.limits.max_pixels:
                raise ApiError(400, f"input 'image': over --max-pixels {self.limits.max_pixels}")
            try:
                pixels = np.asarray(tensor.data, dtype=np.int64).reshape(shape)
            except ValueError:
                raise ApiError(400, "input 'image' UINT8: data do not fill its shape") from None
            if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
                raise ApiError(400, "input 'image' UINT8: values must be in [0, 255]")
            return [("image-0", pixels.astype(np.uint8))]
        raise ApiError(400, f"input 'image': datatype {tensor.datatype!r} (BYTES or UINT8)")

    def _v2_predict(self, name: str, item: bytes | np.ndarray) -> Prediction:
        started = time.perf_counter()
        if isinstance(item, np.ndarray):
            return self._infer(DecodedImage(item), name, started)
        return self._infer(self._decode(item, name), name, started)

    def _v2_response(self, infer: InferRequest, preds: list[Prediction]) -> InferResponse:
        n, labels = len(preds), list(self.predictor.labels)
        records = [p.record for p in preds]
        outputs = [
            ResponseOutput(name="status", datatype="BYTES", shape=[n],
                           data=[r.status.value for r in records]),
            ResponseOutput(name="label", datatype="BYTES", shape=[n],
                           data=[r.label or "" for r in records]),
        ]  # fmt: skip
        if all(r.scores is not None for r in records):  # none at all when one is not assessed
            outputs.append(
                ResponseOutput(
                    name="scores", datatype="FP32", shape=[n, len(labels)],
                    data=[r.scores[lab] for r in records for lab in labels if r.scores],
                    parameters={"labels": labels, "score_kind": records[0].score_kind.value},
                )
            )  # fmt: skip
        outputs.append(
            ResponseOutput(name="record", datatype="BYTES", shape=[n],
                           data=[r.model_dump_json() for r in records])
        )  # fmt: skip
        return InferResponse(
            model_name=self.model_name, model_version=self.predictor.sha256, id=infer.id,
            outputs=outputs,
        )  # fmt: skip


def _dump(model: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = model.model_dump(mode="json", exclude_unset=True)
    return dumped


def _json(model: Any) -> JSONResponse:
    return JSONResponse(_dump(model))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        return _error(404, f"no such endpoint {request.url.path}")
    if exc.status_code == 405:
        return _error(
            405, f"{request.method} not allowed on {request.url.path} (Allow: "
            f"{headers.get('Allow', '')})", headers,
        )  # fmt: skip
    return _error(exc.status_code, str(exc.detail), headers)


async def _gone(request: Request, exc: Exception) -> Response:
    log.info("client went away before its request was read")
    return Response(status_code=400)  # nobody reads it


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("request failed: %s: %s", type(exc).__name__, exc)
    return _error(500, f"internal error ({type(exc).__name__})")


def make_app(predictor: Predictor, limits: Limits = Limits()) -> tuple[Any, Api]:  # noqa: B008
    """The ASGI application (bounds middleware around Starlette) and its Api."""
    metrics = Metrics()
    api = Api(predictor, limits, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().run_in_executor(None, api.warm_up)
        yield
        with contextlib.suppress(Exception):
            await task

    app = Starlette(
        routes=[
            Route("/predict", api.predict, methods=["POST"]),
            Route("/predict/batch", api.predict_batch, methods=["POST"]),
            Route("/health", api.health, methods=["GET"]),
            Route("/ready", api.ready_check, methods=["GET"]),
            Route("/openapi.json", api.openapi, methods=["GET"]),
            Route("/metrics", api.prometheus, methods=["GET"]),
            Route("/v2", api.v2_server, methods=["GET"]),
            Route("/v2/health/live", api.v2_live, methods=["GET"]),
            Route("/v2/health/ready", api.v2_ready, methods=["GET"]),
            Route("/v2/models/{name}", api.v2_model, methods=["GET"]),
            Route("/v2/models/{name}/ready", api.v2_model_ready, methods=["GET"]),
            Route("/v2/models/{name}/infer", api.v2_infer, methods=["POST"]),
        ],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            ClientDisconnect: _gone,
            Exception: _internal,
        },
        lifespan=lifespan,
    )
    return _Bounds(app, limits, metrics), api


class EdgeServer:
    """uvicorn on a socket bound at construction; ``serve_forever`` / ``shutdown`` as stdlib's."""

    def __init__(self, app: Any, sock: socket.socket, limits: Limits, access_log: bool) -> None:
        import uvicorn

        protocol = type("Protocol", (_Protocol,), {"header_timeout": limits.timeout})
        self.socket = sock
        self.config = uvicorn.Config(
            app,
            http=protocol,
            ws="none",
            lifespan="on",
            access_log=False,  # ours (fedbridge.edge) has bytes and milliseconds
            log_config=None,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            backlog=BACKLOG,
            server_header=False,
        )
        self.server = uvicorn.Server(self.config)
        self._stopped = threading.Event()
        if access_log:
            _log_to_stderr()

    @property
    def server_port(self) -> int:
        return int(self.socket.getsockname()[1])

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def _log_to_stderr() -> None:
    """One access line per request on stderr (unless logging was configured already)."""
    for name in ("fedbridge.edge", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (backlog 2048); EdgeError naming --host/--port when it cannot."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
    except OSError as e:  # an unknown name, an address not on this machine, a port in use
        raise EdgeError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
        ) from e
    sock.setblocking(False)
    return sock


def make_server(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    concurrency: int = DEFAULT_CONCURRENCY,
    timeout: float = DEFAULT_TIMEOUT,
    max_files: int = DEFAULT_MAX_FILES,
    access_log: bool = True,
) -> EdgeServer:
    """A server bound to (host, port); port 0 picks a free one (see ``server.server_port``)."""
    limits = Limits(
        max_bytes=max_bytes, max_pixels=max_pixels, concurrency=concurrency, timeout=timeout,
        max_files=max_files,
    )  # fmt: skip
    app, _ = make_app(predictor, limits)
    return EdgeServer(app, bind(host, port), limits, access_log)


# ---- OpenAPI ----------------------------------------------------------------------------------


def openapi_schema(limits: Limits) -> dict[str, Any]:
    """OpenAPI 3.1 for every endpoint; the bodies' schemas are generated from the pydantic
    models the replies are built from (``api_models.component_schemas``)."""
    err = ref(ApiErrorBody)

    def replies(ok: dict[str, Any], *codes: int, media: str = "application/json") -> dict[str, Any]:
        out = {"200": {"description": "OK", "content": {media: {"schema": ok}}}}
        for code in codes:
            out[str(code)] = {
                "description": ERRORS[code],
                "content": {"application/json": {"schema": err}},
            }
        return out

    def get(summary: str, ok: dict[str, Any], *codes: int, **kw: Any) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": replies(ok, *codes, **kw)}}

    overlay = {
        "name": "overlay", "in": "query", "required": False,
        "schema": {"type": "string", "enum": list(OVERLAYS), "default": "none"},
        "description": "png: add overlay_png_base64 (CAM on the image); dicom: the Secondary "
        "Capture and the SR in overlay_dicom_base64 / report_dicom_base64 (DICOM uploads).",
    }  # fmt: skip
    model_name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    binary = {"type": "string", "format": "binary"}
    multipart_one = {
        "type": "object", "properties": {"file": binary}, "required": ["file"],
    }  # fmt: skip
    multipart_many = {
        "type": "object",
        "properties": {"file": {"type": "array", "items": binary, "maxItems": limits.max_files}},
    }
    post_codes = (400, 408, 413, 415, 503)
    live = {"type": "object", "properties": {"live": {"type": "boolean"}}}
    ready_body = {"schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}
    model_ready = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "fedbridge edge", "version": version()},
        "paths": {
            "/predict": {
                "post": {
                    "summary": "Classify one image (PNG, JPEG or DICOM)",
                    "parameters": [
                        overlay,
                        {
                            "name": "name",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "default": "upload"},
                            "description": "image name in the reply (raw bodies)",
                        },
                    ],  # fmt: skip
                    "requestBody": {
                        "required": True,
                        "content": {
                            "image/*": {"schema": binary},
                            "application/dicom": {"schema": binary},
                            "application/octet-stream": {"schema": binary},
                            "multipart/form-data": {"schema": multipart_one},
                        },
                    },
                    "responses": replies(ref(PredictReply), *post_codes),
                }
            },
            "/predict/batch": {
                "post": {
                    "summary": f"Classify up to {limits.max_files} images; errors per file inline",
                    "parameters": [overlay],
                    "requestBody": {
                        "required": True,
                        "content": {"multipart/form-data": {"schema": multipart_many}},
                    },
                    "responses": replies(
                        {"type": "array", "items": {"anyOf": [ref(PredictReply), ref(FileError)]}},
                        *post_codes,
                    ),
                }
            },
            "/health": get("Model hash, labels, backend, version, limits", ref(Health)),
            "/ready": get("200 once the model is loaded and warmed up, else 503", ref(Ready), 503),
            "/metrics": get(
                "Prometheus metrics", {"type": "string"}, media="text/plain; version=0.0.4"
            ),
            "/openapi.json": get("This document", {"type": "object"}),
            "/v2": get("Open Inference Protocol: server metadata", ref(ServerMetadata)),
            "/v2/health/live": get("Open Inference Protocol: liveness", live),
            "/v2/health/ready": {
                "get": {
                    "summary": "Open Inference Protocol: readiness (503 until warmed up)",
                    "responses": {
                        code: {
                            "description": text,
                            "content": {"application/json": ready_body},
                        }
                        for code, text in (("200", "ready"), ("503", "warming up"))
                    },
                }
            },
            "/v2/models/{name}": {
                "get": {
                    "summary": "Open Inference Protocol: model metadata",
                    "parameters": [model_name],
                    "responses": replies(ref(ModelMetadata), 404),
                }
            },
            "/v2/models/{name}/ready": {
                "get": {
                    "summary": "Open Inference Protocol: model readiness (503 until warmed up)",
                    "parameters": [model_name],
                    "responses": {
                        **replies(model_ready, 404),
                        "503": {
                            "description": "warming up",
                            "content": {"application/json": {"schema": model_ready}},
                        },
                    },
                }
            },
            "/v2/models/{name}/infer": {
                "post": {
                    "summary": "Open Inference Protocol: infer (input 'image': BYTES of base64 "
                    "PNG/JPEG/DICOM files, shape [N]; or UINT8 greyscale pixels, [H, W])",
                    "parameters": [model_name],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref(InferRequest)}},
                    },
                    "responses": replies(ref(InferResponse), 400, 404, 408, 413, 503),
                }
            },
        },
        "components": {"schemas": component_schemas()},
    }


ERRORS = {
    400: "Bad request: unreadable image, image over --max-pixels (refused before decoding), "
    "bad query or multipart body",
    408: "The body did not arrive in time",
    413: "Body over --max-bytes (declared or streamed)",
    404: "No such model",
    415: "Unsupported content type",
    503: "Busy (over --concurrency) or not ready",
}
