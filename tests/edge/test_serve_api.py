"""`fedbridge edge serve` as users meet it: the real CLI on 127.0.0.1 (free port), real clients
(curl, requests, raw sockets), a real CXR model and images; the server is stopped by its PID."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from cli import assert_one_line_error, fedbridge
from PIL import Image

from fedbridge_edge.preprocess import list_images
from fedbridge_shared.processes import stop

MAX_BYTES = 4 << 20
TIMEOUT = 3  # --timeout: header and body deadline (s)


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path, model: Path) -> None:
        self.proc, self.url, self.log, self.model = proc, url, log, model
        self.port = int(url.rsplit(":", 1)[1])

    def vm_hwm_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")


def launch(edge_onnx: Path, log: Path, err: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`fedbridge edge serve MODEL --port 0 OPTIONS…` (stdout to ``log``, stderr to ``err``),
    waited for (bounded) until it listens and is warmed up; returns (process, URL)."""
    with open(log, "w") as out, open(err, "w") as errs:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedbridge", "edge", "serve", str(edge_onnx), "--port", "0",
             "--threads", "1", *options],
            stdout=out, stderr=errs, start_new_session=True,
            env={**__import__("os").environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"},
        )  # fmt: skip
    url = None
    for _ in range(600):  # bounded: the CLI prints its URL once it listens
        text = log.read_text()
        if "http://127.0.0.1:" in text:
            url = "http://" + text.split("http://", 1)[1].split()[0]
            break
        if proc.poll() is not None:
            stop([proc])
            raise AssertionError(text + err.read_text())
        time.sleep(0.1)
    if url is None:
        stop([proc])
        raise AssertionError(log.read_text())
    for _ in range(600):  # bounded: /ready turns 200 once the model is warmed up
        if requests.get(f"{url}/ready", timeout=30).status_code == 200:
            break
        time.sleep(0.1)
    return proc, url


@pytest.fixture(scope="module")
def served(edge_onnx, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    err = log.with_suffix(".err")
    proc, url = launch(
        edge_onnx, log, err, "--max-bytes", str(MAX_BYTES), "--timeout", str(TIMEOUT),
        "--max-pixels", "20000000", "--max-files", "4",
    )  # fmt: skip
    try:
        yield Served(proc, url, err, edge_onnx)
    finally:
        stop([proc])


@pytest.fixture(scope="module")
def cxr_image(cxr_parts) -> Path:
    return list_images([cxr_parts["test"]])[0]


def _prediction(body: dict, name: str) -> None:
    assert body["image"] == name, body
    assert body["score_kind"] == ("probability" if body["model"]["calibrated"] else "score")
    assert set(body["scores"]) and abs(sum(body["scores"].values()) - 1) < 1e-5
    assert "overlay_png_base64" not in body  # ?overlay=none is the default


def _raw(port: int, data: bytes, *, linger: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        if linger:  # close with a reset, mid-body
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        return sock.makefile("rb").read()


def test_ready_health_and_openapi(served, edge_onnx):
    from fedbridge_edge.runtime import Predictor

    health = requests.get(f"{served.url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["ready"] is True
    assert health["model_sha256"] == Predictor(edge_onnx).sha256
    assert health["labels"] and health["backend"] == "onnxruntime" and health["version"]
    assert requests.get(f"{served.url}/ready", timeout=30).json() == {"status": "ready"}
    schema = requests.get(f"{served.url}/openapi.json", timeout=30).json()
    assert schema["openapi"].startswith("3.")
    assert {"/predict", "/predict/batch", "/health", "/ready"} <= set(schema["paths"])


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_raw_and_multipart(served, cxr_image):
    raw = subprocess.run(
        ["curl", "-s", "--data-binary", f"@{cxr_image}", f"{served.url}/predict?name=bed-3.jpg"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    _prediction(json.loads(raw.stdout), "bed-3.jpg")
    form = subprocess.run(
        ["curl", "-s", "-F", f"file=@{cxr_image}", f"{served.url}/predict"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    _prediction(json.loads(form.stdout), cxr_image.name)


def test_requests_raw_multipart_and_chunked(served, cxr_image):
    data = cxr_image.read_bytes()
    r = requests.post(f"{served.url}/predict", data=data, timeout=60)
    assert r.status_code == 200, r.text
    _prediction(r.json(), "upload")
    r = requests.post(f"{served.url}/predict", files={"file": (cxr_image.name, data)}, timeout=60)
    assert r.status_code == 200, r.text
    _prediction(r.json(), cxr_image.name)
    chunks = (data[i : i + 4096] for i in range(0, len(data), 4096))  # no length: chunked
    r = requests.post(f"{served.url}/predict", data=chunks, timeout=60)
    assert r.status_code == 200, r.text
    assert (
        r.json()["scores"]
        == requests.post(f"{served.url}/predict", data=data, timeout=60).json()["scores"]
    )


def test_overlay_png_none_and_dicom(served, cxr_image):
    data = cxr_image.read_bytes()
    body = requests.post(f"{served.url}/predict?overlay=png", data=data, timeout=60).json()
    png = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    png.load()
    assert png.format == "PNG" and min(png.size) > 64
    body = requests.post(f"{served.url}/predict?overlay=none", data=data, timeout=60).json()
    assert "overlay_png_base64" not in body and body["scores"]
    r = requests.post(f"{served.url}/predict?overlay=gif", data=data, timeout=60)
    assert r.status_code == 400 and "none, png, dicom" in r.json()["error"]
    r = requests.post(f"{served.url}/predict?overlay=dicom", data=data, timeout=60)
    assert r.status_code == 400 and "needs a DICOM upload" in r.json()["error"]


def test_overlay_dicom_returns_sc_and_sr_in_the_uploads_study(served, cxr_image, tmp_path):
    import pydicom
    from test_dicom import make_dicom

    upload = make_dicom(cxr_image, tmp_path / "scan.dcm")
    source = pydicom.dcmread(upload)
    r = requests.post(
        f"{served.url}/predict?overlay=dicom", files={"file": ("scan.dcm", upload.read_bytes())},
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    sc, sr = (
        pydicom.dcmread(io.BytesIO(base64.b64decode(body[k])))
        for k in ("overlay_dicom_base64", "report_dicom_base64")
    )
    for ds in (sc, sr):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.Modality == "OT" and sr.Modality == "SR"


def test_batch_reports_a_broken_file_inline(served, cxr_parts, bad_inputs):
    images = list_images([cxr_parts["test"]])[:2]
    files = [("file", (p.name, p.read_bytes())) for p in images]
    files.insert(1, ("file", ("broken.jpg", bad_inputs["truncated_jpeg"].read_bytes())))
    r = requests.post(f"{served.url}/predict/batch", files=files, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["image"] for o in out] == [images[0].name, "broken.jpg", images[1].name]
    assert "truncated or corrupt" in out[1]["error"] and "scores" not in out[1]
    assert all(o["scores"] for o in (out[0], out[2]))
    too_many = [("file", (f"{i}.jpg", images[0].read_bytes())) for i in range(5)]
    r = requests.post(f"{served.url}/predict/batch", files=too_many, timeout=120)
    assert r.status_code == 400 and "4" in r.json()["error"]


def test_methods_paths_and_content_types_answer_json(served, cxr_image):
    r = requests.get(f"{served.url}/predict", timeout=30)
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and "GET" in r.json()["error"]
    for method in ("PUT", "OPTIONS", "DELETE"):
        r = requests.request(method, f"{served.url}/predict", timeout=30)
        assert r.status_code == 405 and r.headers["Allow"] == "POST", method
        assert r.headers["Content-Type"] == "application/json" and r.json()["error"]
    r = requests.head(f"{served.url}/predict", timeout=30)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    assert requests.head(f"{served.url}/health", timeout=30).status_code == 200
    r = requests.get(f"{served.url}/no/such/thing", timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "no such endpoint /no/such/thing"}
    r = requests.post(
        f"{served.url}/predict", data=b"{}", headers={"Content-Type": "application/json"},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = requests.post(f"{served.url}/predict", data=b"", timeout=30)
    assert r.status_code == 400 and "empty body" in r.json()["error"]
    r = requests.post(f"{served.url}/predict", data=b"not an image at all", timeout=30)
    assert r.status_code == 400 and "not a readable image" in r.json()["error"]


def test_oversized_bodies_declared_or_streamed_are_413(served):
    reply = _raw(
        served.port,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        + f"Content-Length: {MAX_BYTES + 1}\r\n\r\n".encode()
        + b"\0" * 1024,
    ).decode()
    assert reply.startswith("HTTP/1.1 413") and f"exceeds the {MAX_BYTES} limit" in reply
    chunks = (b"\0" * (1 << 20) for _ in range(8))  # chunked, 8 MB > 4 MB
    try:
        r = requests.post(f"{served.url}/predict", data=chunks, timeout=60)
        assert r.status_code == 413 and str(MAX_BYTES) in r.json()["error"]
    except requests.ConnectionError:  # the server may close before the client sent it all
        pass
    assert requests.get(f"{served.url}/health", timeout=30).status_code == 200


def test_malformed_content_length_gets_json_400_and_the_server_goes_on(served):
    reply = _raw(
        served.port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\nxx"
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert (
        head.startswith(b"HTTP/1.1 400") and "malformed HTTP request" in json.loads(body)["error"]
    )
    assert requests.get(f"{served.url}/health", timeout=30).status_code == 200


def test_a_body_that_does_not_arrive_is_cut(served):
    reply = _raw(
        served.port,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000\r\n\r\n0123456789",
    )  # the client then sends nothing more: the server answers and closes
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and "not received within" in json.loads(body)["error"]


def test_a_decompression_bomb_is_refused_before_decoding(served, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("I;16", (10000, 10000)).save(bomb)  # 100 MP, 16-bit, mostly zero: a small file
    data = bomb.read_bytes()
    assert len(data) < MAX_BYTES
    before = served.vm_hwm_kb()
    for _ in range(5):
        r = requests.post(f"{served.url}/predict", data=data, timeout=60)
        assert r.status_code == 400, r.text
        assert "10000x10000" in r.json()["error"] and "before decoding" in r.json()["error"]
    grew_mb = (served.vm_hwm_kb() - before) / 1024
    print(f"\n[serve] bomb ×5: VmHWM grew {grew_mb:.1f} MB")
    assert grew_mb < 300


def test_64_concurrent_clients_all_succeed(served, cxr_image):
    data = cxr_image.read_bytes()

    def one(i: int) -> int:
        with requests.Session() as s:
            r = s.post(f"{served.url}/predict?name={i}.jpg", data=data, timeout=300)
            return r.status_code if r.json().get("image") == f"{i}.jpg" else -1

    with ThreadPoolExecutor(64) as pool:
        codes = list(pool.map(one, range(64)))
    assert codes == [200] * 64


def test_half_open_connections_and_resets(served, cxr_image):
    """200 sockets that stop mid-header, one that resets mid-body: /health still answers, the
    idle ones are closed by the header timeout, no traceback on stderr."""
    idle = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", served.port), timeout=30)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Half")
            idle.append(s)
        r = requests.get(f"{served.url}/health", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        _raw(
            served.port,
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\xff" * 999,
            linger=True,
        )
        closed = 0
        for s in idle:  # bounded: each recv waits at most the socket timeout (30 s)
            s.settimeout(TIMEOUT * 10)
            try:
                closed += s.recv(1) == b""
            except OSError:  # closed with a reset
                closed += 1
        assert closed == 200
    finally:
        for s in idle:
            s.close()
    data = cxr_image.read_bytes()
    assert requests.post(f"{served.url}/predict", data=data, timeout=60).status_code == 200
    log = served.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert '"POST /predict" 200' in log and " ms" in log  # the access log


def test_serve_options_are_checked_in_one_line(edge_onnx):
    for args, needle in (
        (["--max-pixels", "0"], "--max-pixels 0"),
        (["--concurrency", "0"], "--concurrency 0"),
        (["--timeout", "-1"], "--timeout -1"),
        (["--max-files", "0"], "--max-files 0"),
    ):
        result = fedbridge("edge", "serve", edge_onnx, "--port", "0", *args, timeout=120)
        assert_one_line_error(result, needle)


def test_over_the_concurrency_limit_is_503_json(edge_onnx):
    """In-process, --concurrency 1: a POST whose body is still coming holds the one slot."""
    import threading

    from fedbridge_edge.runtime import Predictor
    from fedbridge_edge.serve import make_server

    server = make_server(
        Predictor(edge_onnx, threads=1), "127.0.0.1", 0, concurrency=1, timeout=20,
        access_log=False,
    )  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        for _ in range(600):  # bounded: until uvicorn has started
            try:
                if requests.get(f"{url}/ready", timeout=30).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as slow:
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0")
            r = None
            for _ in range(100):  # bounded: until the slow request is admitted
                r = requests.post(f"{url}/predict", data=b"x", timeout=30)
                if r.status_code == 503:
                    break
                time.sleep(0.1)
            assert r is not None and r.status_code == 503, r.text
            assert "--concurrency" in r.json()["error"] and r.headers["Retry-After"] == "1"
            assert requests.get(f"{url}/health", timeout=30).status_code == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
    assert not thread.is_alive()


# ---- the contract: every reply validates against the served /openapi.json --------------------


def _validator(doc: dict, schema: dict):
    """A JSON Schema validator for ``schema`` resolving ``#/components/...`` in ``doc``."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator({**doc, **schema})


def _check_reply(doc: dict, path: str, method: str, r: requests.Response) -> None:
    """The reply's status is declared for this operation and its JSON body fits the schema."""
    op = doc["paths"][path][method]
    declared = op["responses"].get(str(r.status_code))
    assert declared is not None, f"{method.upper()} {path}: {r.status_code} not in the schema"
    schema = next(iter(declared["content"].values()))["schema"]
    if "json" not in r.headers.get("content-type", ""):
        return
    errors = sorted(_validator(doc, schema).iter_errors(r.json()), key=str)
    assert not errors, f"{method.upper()} {path} {r.status_code}: {errors[0].message}"
    assert r.headers.get("x-request-id"), "every reply carries X-Request-ID"


def _dicom_bytes(image: Path, tmp_path: Path, orientation: str | None) -> bytes:
    from test_dicom import make_dicom

    path = make_dicom(image, tmp_path / f"{orientation or 'none'}.dcm".replace("\\", "-"))
    if orientation is not None:
        import pydicom

        ds = pydicom.dcmread(path)
        ds.PatientOrientation = orientation.split("\\")
        ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_every_reply_fits_the_published_schema(served, cxr_image, photo_png, tmp_path):
    """ok, out of distribution, DICOM (with UIDs echoed), batch with an inline error, each
    error status, /health, /ready, KServe v2: all validated against /openapi.json."""
    url, doc = served.url, requests.get(f"{served.url}/openapi.json", timeout=30).json()
    ok_reply = requests.post(f"{url}/predict", data=cxr_image.read_bytes(), timeout=60)
    _check_reply(doc, "/predict", "post", ok_reply)
    ood = requests.post(f"{url}/predict?overlay=png", data=photo_png.read_bytes(), timeout=60)
    _check_reply(doc, "/predict", "post", ood)
    assert ood.json()["status"] == "out_of_distribution" and ood.json()["scores"] is None
    dcm = requests.post(
        f"{url}/predict", data=_dicom_bytes(cxr_image, tmp_path, "L\\F"), timeout=60
    )
    _check_reply(doc, "/predict", "post", dcm)
    assert dcm.json()["study_instance_uid"] and dcm.json()["sop_instance_uid"]
    files = [("file", ("a.png", cxr_image.read_bytes())), ("file", ("b.png", b"\x89PNG broken"))]
    batch = requests.post(f"{url}/predict/batch", files=files, timeout=60)
    _check_reply(doc, "/predict/batch", "post", batch)
    assert "error" in batch.json()[1]
    for r in (
        requests.post(f"{url}/predict", data=b"not an image", timeout=30),  # 400
        requests.post(f"{url}/predict?overlay=svg", data=b"x", timeout=30),  # 400
        requests.post(f"{url}/predict", data=b"x" * (MAX_BYTES + 1), timeout=30),  # 413
        requests.post(f"{url}/predict", data=b"{}", headers={"Content-Type": "text/json"}),  # 415
    ):
        assert r.status_code >= 400, r.text
        _check_reply(doc, "/predict", "post", r)
    for path, model in (("/health", "Health"), ("/ready", "Ready")):
        _check_reply(doc, path, "get", requests.get(f"{url}{path}", timeout=30))
        assert doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"][
            "schema"
        ] == {"$ref": f"#/components/schemas/{model}"}
    assert ok_reply.json()["markers"] is None and "PNG" in ok_reply.json()["markers_source"]


def test_open_inference_protocol_v2(served, cxr_image, photo_png):
    """KServe v2: server and model metadata, health, infer with base64 files and UINT8 pixels,
    the client's request id echoed; a wrong model name is 404 JSON."""
    url, doc = served.url, requests.get(f"{served.url}/openapi.json", timeout=30).json()
    server = requests.get(f"{url}/v2", timeout=30)
    _check_reply(doc, "/v2", "get", server)
    assert server.json()["name"] == "fedbridge"
    assert requests.get(f"{url}/v2/health/live", timeout=30).json() == {"live": True}
    assert requests.get(f"{url}/v2/health/ready", timeout=30).json() == {"ready": True}
    health = requests.get(f"{url}/health", timeout=30).json()
    meta = requests.get(f"{url}/v2", timeout=30).json()
    assert meta["version"] == health["version"]
    models = requests.get(f"{url}/v2/models/nonexistent", timeout=30)
    assert models.status_code == 404 and "no model" in models.json()["error"]
    _check_reply(doc, "/v2/models/{name}", "get", models)
    from fedbridge_edge.runtime import Predictor

    name = Predictor(served.model).identity.name
    model = requests.get(f"{url}/v2/models/{name}", timeout=30)
    _check_reply(doc, "/v2/models/{name}", "get", model)
    assert model.json()["versions"] == [health["model_sha256"]]
    assert requests.get(f"{url}/v2/models/{name}/ready", timeout=30).json()["ready"] is True
    body = {
        "id": "req-7",
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                    "data": [base64.b64encode(p.read_bytes()).decode()
                             for p in (cxr_image, photo_png)]}],
    }  # fmt: skip
    r = requests.post(
        f"{url}/v2/models/{name}/infer", json=body, headers={"X-Request-ID": "abc-1"}, timeout=60
    )
    _check_reply(doc, "/v2/models/{name}/infer", "post", r)
    assert r.headers["x-request-id"] == "abc-1" and r.json()["id"] == "req-7"
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["status"]["data"] == ["ok", "out_of_distribution"]
    assert "scores" not in outputs  # one image not assessed: no dense score tensor
    records = [json.loads(x) for x in outputs["record"]["data"]]
    direct = requests.post(f"{url}/predict", data=cxr_image.read_bytes(), timeout=60).json()
    assert records[0]["scores"] == pytest.approx(direct["scores"])
    assert outputs["label"]["data"] == [direct["label"], ""]
    pixels = np.asarray(Image.open(cxr_image).convert("L"))
    one = {"inputs": [{"name": "image", "shape": list(pixels.shape), "datatype": "UINT8",
                       "data": pixels.ravel().tolist()}]}  # fmt: skip
    r = requests.post(f"{url}/v2/models/{name}/infer", json=one, timeout=120)
    _check_reply(doc, "/v2/models/{name}/infer", "post", r)
    scores = next(o for o in r.json()["outputs"] if o["name"] == "scores")
    assert scores["data"] == pytest.approx([direct["scores"][k] for k in health["labels"]])
    bad = requests.post(f"{url}/v2/models/{name}/infer", json={"inputs": []}, timeout=30)
    assert bad.status_code == 400
    _check_reply(doc, "/v2/models/{name}/infer", "post", bad)


def test_metrics_count_predictions_by_status(served, cxr_image, photo_png):
    def count(status: str) -> float:
        text = requests.get(f"{served.url}/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith(f'fedbridge_predictions_total{{status="{status}"}}'):
                return float(line.split()[-1])
        return 0.0

    before_ok, before_ood = count("ok"), count("out_of_distribution")
    requests.post(f"{served.url}/predict", data=cxr_image.read_bytes(), timeout=60)
    requests.post(f"{served.url}/predict", data=photo_png.read_bytes(), timeout=60)
    assert count("ok") == before_ok + 1 and count("out_of_distribution") == before_ood + 1
    assert "fedbridge_ready 1.0" in requests.get(f"{served.url}/metrics", timeout=30).text


def test_dicom_markers_follow_patient_orientation(served, cxr_image, tmp_path):
    """A film hung as usual (L\\F) gets R on the viewer's left; a mirrored one (R\\F) gets
    mirrored markers; a DICOM without PatientOrientation gets none, and says so."""
    seen = {}
    for orientation in ("L\\F", "R\\F", None):
        data = _dicom_bytes(cxr_image, tmp_path, orientation)
        seen[orientation] = requests.post(f"{served.url}/predict", data=data, timeout=60).json()
    assert seen["L\\F"]["markers"] == {"left": "R", "right": "L"}
    assert seen["R\\F"]["markers"] == {"left": "L", "right": "R"}
    assert seen[None]["markers"] is None and "no PatientOrientation" in seen[None]["markers_source"]


def test_an_encoded_newline_in_the_path_cannot_forge_a_log_line(served):
    requests.get(f"{served.url}/x%0a127.0.0.1%20%22GET%20/forged", timeout=30)
    time.sleep(0.5)
    lines = served.log.read_text().splitlines()
    assert not any(line.startswith('127.0.0.1 "GET /forged') for line in lines)
    assert any("\\n127.0.0.1" in line for line in lines)


def _multipart(port: int, body: bytes) -> tuple[bytes, bytes]:
    head = (
        b"POST /predict/batch HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=BOUND\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    reply = _raw(port, head + body)
    status, _, rest = reply.partition(b"\r\n\r\n")
    return status, rest


def test_malformed_multipart_parts_get_400_json(served, cxr_image):
    """Issue #30: a part with no headers, a 100,000-character file name: 400 JSON, no 500."""
    no_headers = b"--BOUND\r\n\r\nxxxx\r\n--BOUND--\r\n"
    status, body = _multipart(served.port, no_headers)
    assert status.startswith(b"HTTP/1.1 400"), status + body
    assert "error" in json.loads(body)
    name = b"a" * 100_000
    long_name = (
        b'--BOUND\r\nContent-Disposition: form-data; name="file"; filename="' + name
        + b'"\r\nContent-Type: image/png\r\n\r\n' + cxr_image.read_bytes() + b"\r\n--BOUND--\r\n"
    )  # fmt: skip
    status, body = _multipart(served.port, long_name)
    assert status.startswith(b"HTTP/1.1 400"), status[:200]
    error = json.loads(body)["error"]  # python-multipart refuses the header, or we the name
    assert "malformed multipart body" in error or "file name of 100000 characters" in error
    assert "Traceback" not in served.log.with_suffix(".err").read_text()
    assert requests.get(f"{served.url}/health", timeout=30).status_code == 200


def test_a_client_that_never_reads_its_reply_is_cut_after_the_timeout(
    edge_onnx, cxr_image, tmp_path
):
    """A /predict/batch client that sends 16 images with ?overlay=png and then reads nothing:
    once the reply fills the socket buffers, the server gives it --timeout seconds, then cuts
    the connection and frees the reply (one log line), and goes on serving."""
    log, err = tmp_path / "serve.log", tmp_path / "serve.err"
    proc, url = launch(
        edge_onnx, log, err, "--timeout", "3", "--max-files", "16", "--max-bytes", str(64 << 20)
    )
    try:
        port = int(url.rsplit(":", 1)[1])
        image = cxr_image.read_bytes()
        boundary = "fedbridgeslowreader"
        parts = (
            b"".join(
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.jpg"'
                f"\r\nContent-Type: image/jpeg\r\n\r\n".encode()
                + image
                + b"\r\n"
                for i in range(16)
            )
            + f"--{boundary}--\r\n".encode()
        )
        head = (
            f"POST /predict/batch?overlay=png HTTP/1.1\r\nHost: x\r\nContent-Type: "
            f"multipart/form-data; boundary={boundary}\r\nContent-Length: {len(parts)}\r\n\r\n"
        ).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that stalls
        sock.connect(("127.0.0.1", port))
        sock.sendall(head + parts)  # ... and never reads
        cut = False
        for _ in range(1200):  # bounded: at most 1200 × 0.1 s
            if "cut a client that read nothing" in err.read_text():
                cut = True
                break
            time.sleep(0.1)
        assert cut, err.read_text()[-2000:]
        sock.settimeout(30)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while sock.recv(1 << 16):  # what was in flight, then the reset
                pass
            raise ConnectionResetError  # a clean EOF after a partial reply is a cut too
        sock.close()
        assert requests.get(f"{url}/health", timeout=30).status_code == 200
    finally:
        stop([proc])
