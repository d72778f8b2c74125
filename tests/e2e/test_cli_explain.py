"""``fedbridge explain`` and ``evaluate --out`` through the real CLI on real CXR and OCT images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from badinputs import write_dicom
from cli import assert_one_line_error, fedbridge, ok
from rich.console import Console

from fedbridge_shared.data.images import read_image
from fedbridge_shared.models import init_model
from fedbridge_shared.spec import save_bundle
from fedbridge_shared.training import TrainConfig, run_stage

SIZE = 96
ALL_METHODS = ["saliency", "shap", "ig", "gradcam", "cam"]


def _subset(src: Path, dst: Path, per_class: int, skip: int = 0) -> Path:
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[skip : skip + per_class]:
            (dst / cls.name / f.name).symlink_to(f.resolve())
    return dst


@pytest.fixture(scope="module")
def bundles(cxr_root, oct_root, tmp_path_factory):
    """A tiny CXR model trained briefly on real images; an untrained tiny OCT model."""
    root = tmp_path_factory.mktemp("explain-cli")
    config = TrainConfig(
        epochs=3, batch_size=16, lr=3e-3, val_fraction=0.0, online_augment=False, preset="none"
    )
    cxr, _ = run_stage(
        "train", _subset(cxr_root, root / "cxr-train", 8), out=root / "cxr-bundle", init="none",
        config=config, arch="test_efficientnet", image_size=SIZE, device="cpu",
        console=Console(quiet=True),
    )  # fmt: skip
    labels = sorted(p.name for p in oct_root.iterdir() if p.is_dir())
    torch.manual_seed(0)
    model, spec = init_model("none", labels, "test_efficientnet", SIZE)
    octb = save_bundle(root / "oct-bundle", spec, model.state_dict(), {"stage": "test"})
    return root, cxr, octb


def _check_outputs(out: Path, n_images: int, methods: list[str]) -> dict:
    record = json.loads((out / "explain.json").read_text())
    assert record["n_images"] == n_images and record["methods"] == methods
    assert len(record["rows"]) == n_images * len(methods)
    for row in record["rows"]:
        amap = np.load(out / row["map"])
        assert amap.shape == (SIZE, SIZE) and np.isfinite(amap).all()
        assert (out / row["overlay"]).read_bytes().startswith(b"\x89PNG")
        assert row["predicted"] in record["labels"] and 0 < row["probability"] <= 1
        assert row["left"] + row["right"] == pytest.approx(1.0)
    csv_lines = (out / "explanations.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + n_images * len(methods)
    assert (out / "class_summary.csv").is_file()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    return record


def test_every_method_on_real_cxr_including_dicom(bundles, cxr_root):
    root, cxr, _ = bundles
    covid = sorted((cxr_root / "COVID19").iterdir())[10]
    dicom = write_dicom(
        root / "normal.dcm", read_image(sorted((cxr_root / "NORMAL").iterdir())[10])
    )
    out = root / "cxr-explained"
    args = [a for m in ALL_METHODS for a in ("--method", m)]
    result = ok("explain", cxr, covid, dicom, "--out", out, *args, "--sanity")
    record = _check_outputs(out, 2, ALL_METHODS)
    assert {Path(r["file"]).name for r in record["rows"]} == {covid.name, "normal.dcm"}
    assert next(r for r in record["rows"] if r["file"] == str(covid))["true_label"] == "COVID19"
    sanity = json.loads((out / "sanity.json").read_text())
    assert set(sanity["methods"]) == set(ALL_METHODS) and sanity["n_images"] == 2
    assert "Sanity check" in result.stdout and "Where the model looks" in result.stdout
    for method in ALL_METHODS:
        assert re.search(rf"{method}\s.*(passes|fails sanity check|undefined)", result.stdout)


def test_every_method_on_a_folder_of_real_oct_with_a_target(bundles, oct_root, tmp_path):
    _, _, octb = bundles
    folder = _subset(oct_root, tmp_path / "oct", 1)
    out = tmp_path / "oct-explained"
    args = [a for m in ALL_METHODS for a in ("--method", m)]
    ok("explain", octb, folder, "--out", out, *args, "--target", "DME")
    record = _check_outputs(out, 4, ALL_METHODS)
    assert {r["target"] for r in record["rows"]} == {"DME"}
    assert {r["true_label"] for r in record["rows"]} == {"CNV", "DME", "DRUSEN", "NORMAL"}
    assert set(record["class_summary"]["shap"]["true"]) == {"CNV", "DME", "DRUSEN", "NORMAL"}
    assert not (out / "sanity.json").exists()


def test_bad_target_and_unreadable_image_write_nothing(bundles, cxr_root, tmp_path):
    root, cxr, _ = bundles
    good = sorted((cxr_root / "NORMAL").iterdir())[0]
    out = tmp_path / "never"
    result = fedbridge("explain", cxr, good, "--out", out, "--target", "PNEUMONIA")
    assert_one_line_error(result, "--target 'PNEUMONIA'", "COVID19")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:300])
    result = fedbridge("explain", cxr, good, broken, "--out", out)
    assert_one_line_error(result, str(broken))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["broken.jpg"]


def test_evaluate_out_writes_the_html_report(bundles, cxr_root):
    root, cxr, _ = bundles
    test = _subset(cxr_root, root / "cxr-test", 3, skip=30)
    report = root / "report"
    ok("evaluate", cxr, test, "--out", report, "--bootstrap", "50")
    text = (report / "report.html").read_text(encoding="utf-8")
    for section in ("config", "counts", "metrics", "confusion", "roc", "rounds", "saliency"):
        assert f'<section id="{section}">' in text, section
    assert "test: cxr-test" in text and "training: train" in text
    assert text.count('<div class="cell') >= 4  # at least one example per class
    assert "http://" not in text and "https://" not in text
    for name in ("metrics.json", "confusion_matrix.png", "roc.png"):
        assert (report / name).is_file()
