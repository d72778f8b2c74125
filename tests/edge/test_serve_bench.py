"""The HTTP API in-process on 127.0.0.1 (free port, stopped in the test) and the benchmark.

tests/edge/test_serve_api.py drives the CLI-started server with curl, requests and sockets.
"""

import base64
import http.client
import io
import json
import threading

import pytest
from PIL import Image

from fedbridge_edge.bench import bench
from fedbridge_edge.preprocess import list_images
from fedbridge_edge.runtime import Predictor
from fedbridge_edge.serve import make_server


@pytest.fixture(scope="module")
def server(edge_onnx):
    srv = make_server(Predictor(edge_onnx), "127.0.0.1", 0, max_bytes=2 << 20)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def _request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_health(server, edge_onnx):
    status, body = _request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert body["model_sha256"] == Predictor(edge_onnx).sha256


def test_post_real_image_round_trip(server, cxr_parts):
    image = list_images([cxr_parts["test"]])[0]
    status, body = _request(server, "POST", "/predict?overlay=png", image.read_bytes())
    assert status == 200, body
    assert body["label"] in body["scores"] and body["ood"] is False
    png = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    assert png.format == "PNG" and png.mode == "RGB" and min(png.size) > 64
    print(f"serve round trip: latency_ms {body['latency_ms']}")


def test_oversized_body_is_413_before_it_is_read(server):
    """Only the headers are sent: the server must answer from Content-Length alone."""
    import socket

    with socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            + f"Content-Length: {(2 << 20) + 1}\r\n\r\n".encode()
            + b"\0" * 1024
        )
        reply = sock.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.1 413")
    assert "exceeds the 2097152 limit" in reply


def test_bad_image_is_400_with_message(server, bad_inputs):
    status, body = _request(server, "POST", "/predict", bad_inputs["truncated_jpeg"].read_bytes())
    assert status == 400 and "truncated or corrupt" in body["error"]
    assert "/tmp" not in body["error"]  # the temp file name is not leaked
    status, body = _request(server, "POST", "/predict", b"")
    assert status == 400
    status, _ = _request(server, "GET", "/nothing")
    assert status == 404


def test_dicom_upload(server, bad_inputs):
    """The MONOCHROME1 file holds a CXR's grey values, so displayed it is a negative: decoded,
    predicted, and the label withheld (its pixel statistics are far from any calibration CXR)."""
    status, body = _request(server, "POST", "/predict", bad_inputs["dicom_mono1"].read_bytes())
    assert status == 200 and body["status"] == "out_of_distribution"
    assert body["label"] is None and body["scores"] is None and body["reason"]
    assert body["input_distance"] > 0 and body["input_orientation"] > 0


def test_bench_reports_batch_1_and_8(edge_onnx):
    result = bench(Predictor(edge_onnx), iters=5, warmup=1)
    for key in ("batch_1", "batch_8"):
        row = result[key]
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["images_per_s"] > 0
