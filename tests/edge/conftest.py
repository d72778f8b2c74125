"""Edge fixtures: out-of-distribution inputs (the CXR bundle and its ONNX: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def photo_png(tmp_path_factory) -> Path:
    """A natural-photo-like RGB scene (sky, sun, hills, house) drawn with PIL."""
    from PIL import ImageDraw

    img = Image.new("RGB", (320, 240))
    draw = ImageDraw.Draw(img)
    for y in range(150):  # sky gradient
        draw.line([(0, y), (320, y)], fill=(90 + y // 3, 150 + y // 4, 255))
    draw.rectangle([0, 150, 320, 240], fill=(60, 140, 50))
    draw.ellipse([240, 20, 290, 70], fill=(255, 230, 90))
    draw.polygon([(0, 160), (90, 90), (180, 160)], fill=(90, 110, 80))
    draw.rectangle([120, 140, 200, 210], fill=(180, 60, 50))
    draw.polygon([(110, 140), (160, 100), (210, 140)], fill=(110, 40, 30))
    draw.rectangle([150, 170, 170, 210], fill=(70, 40, 20))
    path = tmp_path_factory.mktemp("ood") / "photo.jpg"
    img.save(path, quality=92)
    return path


@pytest.fixture(scope="session")
def noise_png(tmp_path_factory) -> Path:
    """Uniform random noise, 256×256 greyscale."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("noise") / "noise.png"
    Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def int8_onnx(cxr_bundle, cxr_parts, tmp_path_factory):
    """INT8 written by export, with the CAM threshold lowered in-process (the 0.47 M-parameter
    model's 4×4 CAM misses the real 0.9 by a hair; the refusal is tested below)."""
    from unittest import mock

    from fedbridge_edge import quantize
    from fedbridge_edge.export import export_onnx

    out = tmp_path_factory.mktemp("int8") / "model-int8.onnx"
    with mock.patch.object(quantize, "MIN_CAM_RANK_CORR", 0.8):
        result = export_onnx(cxr_bundle, out, val=cxr_parts["val"], int8_calib=cxr_parts["train"])
    assert result.int8 is not None and "refused" not in result.int8
    return out
