"""``fedbridge edge serve``: a small HTTP API for bedside integration (stdlib only).

``POST /predict`` with the raw image bytes (PNG, JPEG or DICOM) as the body → the per-image JSON
plus ``overlay_png_base64``. ``GET /health`` → model hash, backend, labels. Bodies over
``max_bytes`` are refused with 413 before being read; undecodable images get 400 with the reason.
Bind to 127.0.0.1 (the default) and put an authenticating proxy in front for anything wider.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fedbridge_edge.errors import EdgeError
from fedbridge_edge.preprocess import decode_bytes
from fedbridge_edge.runtime import Predictor
from fedbridge_shared.errors import FedbridgeError

log = logging.getLogger("fedbridge.edge")

DEFAULT_MAX_BYTES = 32 << 20


def make_server(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ThreadingHTTPServer:
    """A server bound to (host, port); port 0 picks a free one (see ``server.server_port``)."""
    lock = threading.Lock()  # one inference at a time: TensorRT contexts are not thread-safe

    class Handler(BaseHTTPRequestHandler):
        server_version = "fedbridge-edge/1"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args) -> None:  # quiet by default
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/health":
                return self._send(404, {"error": f"no such endpoint {self.path}"})
            self._send(
                200,
                {
                    "status": "ok",
                    "backend": predictor.backend,
                    "model_sha256": predictor.sha256,
                    "labels": predictor.labels,
                    "max_bytes": max_bytes,
                },
            )

        def do_POST(self) -> None:
            if self.path.split("?")[0].rstrip("/") != "/predict":
                return self._send(404, {"error": f"no such endpoint {self.path}"})
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._send(411, {"error": "Content-Length header required"})
            if int(length) > max_bytes:
                return self._send(
                    413, {"error": f"body of {int(length)} bytes exceeds the {max_bytes} limit"}
                )
            if int(length) == 0:
                return self._send(400, {"error": "empty body: POST the image bytes"})
            started = time.perf_counter()
            body = self.rfile.read(int(length))
            try:
                grey = decode_bytes(body, "upload")
                with lock:
                    pred = predictor.predict_array(grey, "upload", started)
            except FedbridgeError as e:
                return self._send(400, {"error": str(e)})
            except Exception as e:  # a reader bug must not drop the connection without a reply
                log.error("predict failed: %s: %s", type(e).__name__, e)
                return self._send(500, {"error": f"internal error ({type(e).__name__})"})
            result = pred.to_json()
            result["overlay_png_base64"] = base64.b64encode(pred.overlay_png()).decode()
            self._send(200, result)

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:  # an unknown name, an address not on this machine, a port in use
        raise EdgeError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
        ) from e
    server.daemon_threads = True
    return server
