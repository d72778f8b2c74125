"""``fedbridge edge serve``: the bedside HTTP API (Starlette on uvicorn, no torch).

Endpoints (``GET /openapi.json`` describes them):

- ``POST /predict``: the image (PNG, JPEG or DICOM) as the raw body (``?name=`` names it in the
  reply, else ``"upload"``) or as ``multipart/form-data`` field ``file`` (its filename names it).
  ``?overlay=none`` (default) | ``png`` (adds ``overlay_png_base64``) | ``dicom`` (a DICOM
  Secondary Capture, when ``fedbridge_edge.dicom_out`` provides one, else 400).
- ``POST /predict/batch``: multipart with up to ``max_files`` files → a JSON list, one entry per
  file; a file that cannot be read gets ``{"image", "error"}`` without failing the others.
- ``GET /health`` (model, labels, backend, version) and ``GET /ready`` (503 until warmed up).

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
import contextlib
import importlib
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
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

from fedbridge_edge.errors import EdgeError
from fedbridge_edge.preprocess import check_declared_size, decode_bytes
from fedbridge_edge.runtime import Prediction, Predictor
from fedbridge_shared.errors import FedbridgeError

log = logging.getLogger("fedbridge.edge")

DEFAULT_MAX_BYTES = 32 << 20
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_CONCURRENCY = 128
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_FILES = 16
BACKLOG = 2048
MAX_HEADER_BYTES = 16 << 10
OVERLAYS = ("none", "png", "dicom")
RAW_TYPES = (
    "",
    "application/octet-stream",
    "application/dicom",
    "application/x-www-form-urlencoded",  # curl --data-binary and urllib send this by default
)

Scope = dict[str, Any]
Message = dict[str, Any]
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
    try:
        from importlib.metadata import version as dist_version

        return dist_version("fedbridge")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return getattr(importlib.import_module("fedbridge_shared"), "__version__", "unknown")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status in (408, 413):  # the rest of the body may be unread: do not reuse the connection
        headers.setdefault("Connection", "close")
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ---- ASGI middleware: body bounds, admission, access log ------------------------------------


class _Bounds:
    """Declared and streamed body size, body deadline, requests in flight, access log."""

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limits, self.in_flight = app, limits, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, sent = time.perf_counter(), 0, 0

        async def send_logged(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self._handle(scope, receive, send_logged)
        finally:
            path = scope["path"] + (
                f"?{scope['query_string'].decode()}" if scope["query_string"] else ""
            )
            host_port = scope.get("client")
            client = f"{host_port[0]}:{host_port[1]}" if host_port else "-"
            log.info(
                '%s "%s %s" %s %d B %.1f ms',
                client, scope["method"], path, status or "-", sent,
                (time.perf_counter() - started) * 1e3,
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
        super().connection_lost(exc)

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

    def __init__(self, predictor: Predictor, limits: Limits) -> None:
        self.predictor, self.limits = predictor, limits
        self.ready = False
        self.infer_lock = threading.Lock()  # one inference at a time (TensorRT contexts)
        self.decoders = threading.BoundedSemaphore(2)

    def warm_up(self) -> None:
        size = self.predictor.spec.image_size
        with self.infer_lock:
            self.predictor.predict_array(np.zeros((size, size), np.uint8), "warm-up")
        self.ready = True

    async def health(self, request: Request) -> Response:
        p = self.predictor
        return JSONResponse(
            {
                "status": "ok",
                "ready": self.ready,
                "model_sha256": p.sha256,
                "labels": p.labels,
                "backend": p.backend,
                "version": version(),
                "max_bytes": self.limits.max_bytes,
                "max_pixels": self.limits.max_pixels,
            }
        )

    async def ready_check(self, request: Request) -> Response:
        if not self.ready:
            return _error(503, "model warming up", {"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_schema(self.limits))

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
            files = []
            for _, value in form.multi_items():
                if hasattr(value, "read"):
                    files.append((value.filename or "upload", await value.read()))
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

    async def _predict_one(self, name: str, data: bytes, overlay: str) -> dict[str, Any]:
        """Decode, infer and render in one worker thread (the event loop stays free)."""
        return await run_in_threadpool(self._predict_sync, name, data, overlay)

    def _predict_sync(self, name: str, data: bytes, overlay: str) -> dict[str, Any]:
        started = time.perf_counter()
        with self.decoders:  # decoded images in memory at once, bounded
            check_declared_size(data, self.limits.max_pixels, name)
            grey = decode_bytes(data, name)
        with self.infer_lock:
            pred = self.predictor.predict_array(grey, name, started)
        return self._render(pred, data, overlay)

    def _render(self, pred: Prediction, data: bytes, overlay: str) -> dict[str, Any]:
        result = pred.to_json()
        if overlay == "png":
            result["overlay_png_base64"] = base64.b64encode(pred.overlay_png()).decode()
        elif overlay == "dicom":  # the Secondary Capture and the SR, in the upload's study
            import io

            import pydicom

            from fedbridge_edge import dicom_out

            if not (len(data) > 132 and data[128:132] == b"DICM"):
                raise ApiError(
                    400, f"{pred.image}: ?overlay=dicom needs a DICOM upload (its patient and "
                    "study go into the results); use ?overlay=png"
                )  # fmt: skip
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            from fedbridge_edge import _legacy_record  # until runtime carries .record

            record = _legacy_record.record_of(pred, _legacy_record.model_identity(self.predictor))
            codes = _legacy_record.codes_of(self.predictor)
            png = pred.overlay_png()
            sc, sr = dicom_out.build(record, png, header, codes=codes, name=pred.image)
            result["overlay_dicom_base64"] = base64.b64encode(dicom_out.encode(sc)).decode()
            result["report_dicom_base64"] = base64.b64encode(dicom_out.encode(sr)).decode()
        return result

    async def predict(self, request: Request) -> Response:
        overlay = self._overlay(request)
        files = await self._files(request)
        if len(files) > 1:
            raise ApiError(400, f"{len(files)} files sent: /predict takes one (/predict/batch)")
        name, data = files[0]
        try:
            return JSONResponse(await self._predict_one(name, data, overlay))
        except FedbridgeError as e:  # ImageTooLarge (over --max-pixels) included
            raise ApiError(400, str(e)) from e

    async def predict_batch(self, request: Request) -> Response:
        overlay = self._overlay(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise ApiError(415, f"content type {ctype!r}: /predict/batch takes multipart/form-data")
        results = []
        for name, data in await self._files(request):
            try:
                results.append(await self._predict_one(name, data, overlay))
            except FedbridgeError as e:
                results.append({"image": name, "error": str(e)})
        return JSONResponse(results)


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
    api = Api(predictor, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
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
        ],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            ClientDisconnect: _gone,
            Exception: _internal,
        },
        lifespan=lifespan,
    )
    return _Bounds(app, limits), api


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
        return self.socket.getsockname()[1]

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
    """OpenAPI 3.1 for every endpoint (written by hand: Starlette has no models to derive it)."""
    err = {"$ref": "#/components/schemas/Error"}
    pred = {"$ref": "#/components/schemas/Prediction"}

    def replies(ok: dict, *codes: int) -> dict:
        out = {"200": {"description": "OK", "content": {"application/json": {"schema": ok}}}}
        for code in codes:
            out[str(code)] = {
                "description": ERRORS[code],
                "content": {"application/json": {"schema": err}},
            }
        return out

    overlay = {
        "name": "overlay", "in": "query", "required": False,
        "schema": {"type": "string", "enum": list(OVERLAYS), "default": "none"},
        "description": "png: add overlay_png_base64 (CAM on the image); dicom: a DICOM "
        "Secondary Capture in overlay_dicom_base64 where available (else 400).",
    }  # fmt: skip
    binary = {"type": "string", "format": "binary"}
    multipart_one = {
        "type": "object", "properties": {"file": binary}, "required": ["file"],
    }  # fmt: skip
    multipart_many = {
        "type": "object",
        "properties": {"file": {"type": "array", "items": binary, "maxItems": limits.max_files}},
    }
    post_codes = (400, 408, 413, 415, 503)
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
                    "responses": replies(pred, *post_codes),
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
                        {
                            "type": "array",
                            "items": {"oneOf": [pred, {"$ref": "#/components/schemas/FileError"}]},
                        },  # noqa: E501
                        *post_codes,
                    ),
                }
            },
            "/health": {
                "get": {
                    "summary": "Model hash, labels, backend, version, limits",
                    "responses": replies({"$ref": "#/components/schemas/Health"}),
                }
            },
            "/ready": {
                "get": {
                    "summary": "200 once the model is loaded and warmed up, else 503",
                    "responses": replies({"type": "object"}, 503),
                }
            },
            "/openapi.json": {
                "get": {"summary": "This document", "responses": replies({"type": "object"})}
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "FileError": {
                    "type": "object",
                    "required": ["image", "error"],
                    "properties": {"image": {"type": "string"}, "error": {"type": "string"}},
                },
                "Prediction": {
                    "type": "object",
                    "required": ["image", "probabilities", "model_sha256", "backend"],
                    "properties": {
                        "image": {"type": "string"},
                        "status": {"type": "string", "enum": ["ok", "out_of_distribution"]},
                        "label": {"type": ["string", "null"]},
                        "reason": {"type": ["string", "null"]},
                        "probabilities": {
                            "type": "object",
                            "additionalProperties": {"type": "number"},
                        },
                        "ood": {"type": "boolean"},
                        "ood_score": {"type": "number"},
                        "ood_threshold": {"type": "number"},
                        "energy": {"type": "number"},
                        "model_sha256": {"type": "string"},
                        "backend": {"type": "string"},
                        "latency_ms": {"type": "number"},
                        "inference_ms": {"type": "number"},
                        "overlay_png_base64": {"type": "string"},
                        "overlay_dicom_base64": {"type": "string"},
                    },
                },
                "Health": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "string"},
                        "ready": {"type": "boolean"},
                        "model_sha256": {"type": "string"},
                        "labels": {"type": "array", "items": {"type": "string"}},
                        "backend": {"type": "string"},
                        "version": {"type": "string"},
                        "max_bytes": {"type": "integer"},
                        "max_pixels": {"type": "integer"},
                    },
                },
            }  # fmt: skip
        },
    }


ERRORS = {
    400: "Bad request: unreadable image, image over --max-pixels (refused before decoding), "
    "bad query or multipart body",
    408: "The body did not arrive in time",
    413: "Body over --max-bytes (declared or streamed)",
    415: "Unsupported content type",
    503: "Busy (over --concurrency) or not ready",
}
