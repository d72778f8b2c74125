"""The assessment report and the explain index, opened in a real browser (headless Chromium).

A page a clinician opens must load without errors, decode every image, show the numbers the run
wrote, and read in a 600 px window without scrolling sideways (a table may scroll in its box).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from browser import view
from cli import ok
from PIL import Image

NARROW = 600


def _subset(part, dst, per_class):
    for cls in sorted(p for p in part.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            os.symlink(f.resolve(), dst / cls.name / f.name)
    return dst


@pytest.fixture(scope="module")
def pages(cxr_bundle, cxr_parts, tmp_path_factory):
    """``evaluate --out`` and ``explain --sanity`` of the real CXR bundle on unseen patients."""
    root = tmp_path_factory.mktemp("browser")
    test = _subset(cxr_parts["test"], root / "test", per_class=6)
    ok("evaluate", cxr_bundle, test, "--out", root / "report", "--bootstrap", "50")
    images = _subset(cxr_parts["test"], root / "explain-in", per_class=1)
    ok(
        "explain", cxr_bundle, images, "--out", root / "explain",
        "--method", "saliency", "--method", "cam", "--sanity", "--sanity-images", "2",
    )  # fmt: skip
    return root


def _not_blank(shot):
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape[1] > 0 and pixels.std() > 5  # a page, not an empty canvas


@pytest.mark.parametrize("width", [NARROW, 1200])
def test_report_loads_decodes_every_image_and_fits_the_window(pages, tmp_path, width):
    metrics = json.loads((pages / "report" / "metrics.json").read_text())
    shot = tmp_path / "report.png"
    seen = view(pages / "report" / "report.html", width=width, screenshot=shot)
    assert seen.errors == []
    assert seen.n_images >= 6 and seen.broken_images == []
    assert seen.scroll_width <= width, f"page is {seen.scroll_width} px wide in a {width} px window"
    for needle in (
        f"{metrics['accuracy']:.3f}",
        f"{metrics['macro_auc']:.3f}",
        f"{metrics['calibration']['ece']:.3f}",
        f"n = {metrics['n']} images",
        *metrics["labels"],
        "Model card",
        "Lineage",
    ):
        assert needle in seen.text, needle
    _not_blank(shot)


def test_explain_index_shows_every_image_and_map(pages, tmp_path):
    record = json.loads((pages / "explain" / "explain.json").read_text())
    shot = tmp_path / "explain.png"
    seen = view(pages / "explain" / "index.html", width=NARROW, screenshot=shot)
    assert seen.errors == [] and seen.broken_images == []
    # one overlay per image and method, plus one colour bar per method
    assert seen.n_images == len(record["rows"]) + len(record["methods"])
    assert seen.scroll_width <= NARROW
    for row in record["rows"]:
        assert f"predicted {row['predicted']} ({row['probability']:.2f})" in seen.text
    assert "cam is signed" in seen.text and "saliency is unsigned" in seen.text
    assert "Sanity check" in seen.text and record["bundle"]["sha256"][:16] in seen.text
    _not_blank(shot)
