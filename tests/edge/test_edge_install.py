"""The bedside install: a fresh venv with only ``pip install ".[edge]"``, no torch.

It predicts a real chest X-ray with the model exported by the full install, and serves it over
HTTP on loopback, while ``import torch`` fails there. The venv's size and package count are
printed (the README quotes them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fedbridge_edge.preprocess import list_images
from fedbridge_shared.processes import stop

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    """The environment without this interpreter's paths: Ray, started in-process by earlier
    tests, exports a PYTHONPATH with the full venv's site-packages, which would put torch
    back in reach of the edge venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "PYTHONBREAKPOINT")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=clean_env(), **kw
    )


def python310() -> Path | None:
    """A Python 3.10 interpreter (JetPack 6's), if this machine has one."""
    candidates = [os.environ.get("FEDBRIDGE_PYTHON310", ""), shutil.which("python3.10") or ""]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))
    for c in filter(None, candidates):
        done = _run(c, "-c", "import sys; print(sys.version_info[:2] == (3, 10))")
        if done.returncode == 0 and done.stdout.strip() == "True":
            return Path(c)
    return None


@pytest.fixture(scope="module", params=["py3.11", "py3.10"])
def edge_venv(request, tmp_path_factory) -> Path:
    """The bedside venv on this interpreter and on Python 3.10 (JetPack 6 ships 3.10)."""
    venv = tmp_path_factory.mktemp("edge-install") / "venv"
    if request.param == "py3.10":
        base = python310()
        if base is None:
            pytest.skip("no Python 3.10 on this machine: the edge runs on 3.10 only untested here")
    else:
        base = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter, not the test venv's
        base = base if base.exists() else Path(sys.executable)
    assert _run(base, "-m", "venv", venv).returncode == 0
    pip = _run(venv / "bin/python", "-m", "pip", "install", "--quiet", f"{REPO}[edge]")
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


def test_the_edge_install_has_no_torch_and_no_training_stack(edge_venv):
    py = edge_venv / "bin/python"
    for module in ("torch", "timm", "flwr", "albumentations", "sklearn", "matplotlib"):
        result = _run(py, "-c", f"import {module}")
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, module
    assert _run(py, "-c", "import onnxruntime, fedbridge_edge.runtime").returncode == 0
    listed = json.loads(_run(py, "-m", "pip", "list", "--format", "json").stdout)
    size = sum(f.stat().st_size for f in edge_venv.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"\n[edge] venv: {len(listed)} packages (pip included), {size / 1e6:.0f} MB")
    assert not {p["name"].lower() for p in listed} & {"torch", "timm", "flwr", "ray"}


def test_the_edge_install_predicts_a_real_image(edge_venv, edge_onnx, cxr_parts, tmp_path):
    image = list_images([cxr_parts["test"]])[0]
    fedbridge = edge_venv / "bin/fedbridge"
    result = _run(fedbridge, "edge", "predict", edge_onnx, image, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / f"{image.stem}.json").read_text())
    assert record["label"] in record["scores"]
    assert abs(sum(record["scores"].values()) - 1) < 1e-5
    assert (tmp_path / "out" / record["overlay"]).stat().st_size > 1000
    # a training command says which extra it needs, in one line
    train = _run(fedbridge, "train", cxr_parts["train"], "--out", tmp_path / "b")
    assert train.returncode == 2 and "Traceback" not in train.stderr, train.stderr
    assert "pip install 'fedbridge[train]'" in train.stderr


def test_the_edge_install_serves_over_http(edge_venv, edge_onnx, cxr_parts, tmp_path):
    image = list_images([cxr_parts["test"]])[0]
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(edge_venv / "bin/fedbridge"), "edge", "serve", str(edge_onnx), "--port", "0"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**clean_env(), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
            start_new_session=True,
        )
    try:
        url = None
        for _ in range(600):  # bounded: the server prints its address once it listens
            text = log.read_text()
            if "http://127.0.0.1:" in text:
                url = text.split("http://", 1)[1].split()[0]
                break
            assert proc.poll() is None, text
            proc_wait(proc)
        assert url, log.read_text()
        with urllib.request.urlopen(f"http://{url}/health", timeout=60) as r:
            assert json.loads(r.read())["status"] == "ok"
        request = urllib.request.Request(f"http://{url}/predict", data=image.read_bytes())
        with urllib.request.urlopen(request, timeout=60) as r:
            body = json.loads(r.read())
        assert body["label"] in body["scores"] and body["backend"] == "onnxruntime"
    finally:
        stop([proc])


def proc_wait(proc: subprocess.Popen) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
