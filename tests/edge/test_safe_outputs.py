"""Safe bedside outputs: the OOD matrix on a tiny and a real model, withheld labels, overlays.

Out of distribution, no label leaves the device: ``label`` and ``probabilities`` are null, the
overlay says NOT ASSESSED and shows no heat map. The input-level test does not depend on the model
being good, so a tiny model at 64 px flags the same inputs as a real one.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from cli import assert_one_line_error, fedbridge, ok
from PIL import Image

from fedbridge_edge import overlay
from fedbridge_edge.preprocess import list_images
from fedbridge_edge.runtime import Predictor
from fedbridge_shared.data.images import read_image

GROUP = 24  # images per transformed group (inverted, rotated, other modality)


def _parts(root: Path, tmp: Path) -> dict[str, Path]:
    from fedbridge_shared.data.samples import scan_folder
    from fedbridge_shared.data.split import assign_parts

    parts = assign_parts(scan_folder(root).samples, {"train": 0.5, "val": 0.2, "test": 0.3}, seed=0)
    for name, samples in parts.items():
        for s in samples:
            (tmp / name / s.label).mkdir(parents=True, exist_ok=True)
            os.symlink(s.path, tmp / name / s.label / s.path.name)
    return {name: tmp / name for name in parts}


def _tiny_onnx(parts: dict[str, Path], tmp: Path) -> Path:
    """``test_efficientnet`` at 64 px from random init, a few epochs: a weak model."""
    from rich.console import Console

    from fedbridge_shared.training import TrainConfig, run_stage

    config = TrainConfig(
        epochs=4, batch_size=32, lr=3e-3, val_fraction=0.0, online_augment=False, preset="none"
    )
    bundle = tmp / "bundle"
    run_stage(
        "target", parts["train"], out=bundle, init="none", config=config,
        arch="test_efficientnet", image_size=64, device="cpu",
        console=Console(stderr=True, quiet=True),
    )  # fmt: skip
    out = tmp / "tiny.onnx"
    ok("export", "onnx", bundle, "--out", out, "--val-data", parts["val"])
    return out


@pytest.fixture(scope="module")
def oct_parts(oct_root, tmp_path_factory) -> dict[str, Path]:
    return _parts(oct_root, tmp_path_factory.mktemp("oct-parts"))


@pytest.fixture(scope="module")
def tiny_cxr_onnx(cxr_parts, tmp_path_factory) -> Path:
    return _tiny_onnx(cxr_parts, tmp_path_factory.mktemp("tiny-cxr"))


@pytest.fixture(scope="module")
def tiny_oct_onnx(oct_parts, tmp_path_factory) -> Path:
    return _tiny_onnx(oct_parts, tmp_path_factory.mktemp("tiny-oct"))


def _flagged(predictor: Predictor, greys: list[np.ndarray]) -> float:
    preds = [predictor.predict_array(g, f"image-{i}") for i, g in enumerate(greys)]
    for p in preds:  # withheld everywhere in the record
        record = p.to_json()
        assert (record["label"] is None) == p.ood == (record["status"] == "out_of_distribution")
        assert (record["scores"] is None) == p.ood and bool(record["reason"]) == p.ood
    return float(np.mean([p.ood for p in preds]))


def _matrix(modality_test: Path, other_modality: Path, photo: Path) -> dict[str, list]:
    rng = np.random.default_rng(0)
    test = [read_image(p) for p in list_images([modality_test])[::3][:GROUP]]
    return {
        "uniform noise": [rng.integers(0, 256, (256, 256), dtype=np.uint8) for _ in range(3)],
        "gaussian noise": [
            np.clip(rng.normal(128, 40, (300, 300)), 0, 255).astype(np.uint8) for _ in range(3)
        ],
        "black": [np.zeros((256, 256), np.uint8)],
        "white": [np.full((256, 256), 255, np.uint8)],
        "mid grey": [np.full((256, 256), 128, np.uint8)],
        "other modality": [read_image(p) for p in list_images([other_modality])[::17][:GROUP]],
        "natural photo": [read_image(photo)],
        "inverted": [255 - g for g in test],
        "rotated 90°": [np.rot90(g).copy() for g in test],
    }


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_cxr_model_flags_the_ood_matrix_and_few_unseen_patients(
    which, edge_onnx, tiny_cxr_onnx, cxr_parts, oct_root, photo_png
):
    predictor = Predictor(edge_onnx if which == "real" else tiny_cxr_onnx)
    rates = {
        name: _flagged(predictor, greys)
        for name, greys in _matrix(cxr_parts["test"], oct_root, photo_png).items()
    }
    unseen = [read_image(p) for p in list_images([cxr_parts["test"]])]
    in_distribution = _flagged(predictor, unseen)
    print(f"{which} CXR model: flagged {rates}; unseen CXR patients {in_distribution:.3f}")
    assert all(rate >= 0.9 for rate in rates.values()), rates
    assert in_distribution <= 0.05


def test_oct_model_flags_chest_x_rays(tiny_oct_onnx, oct_parts, cxr_root, photo_png):
    predictor = Predictor(tiny_oct_onnx)
    rates = {
        name: _flagged(predictor, greys)
        for name, greys in _matrix(oct_parts["test"], cxr_root, photo_png).items()
    }
    unseen = [read_image(p) for p in list_images([oct_parts["test"]])]
    in_distribution = _flagged(predictor, unseen)
    print(f"tiny OCT model: flagged {rates}; unseen OCT images {in_distribution:.3f}")
    assert all(rate >= 0.9 for rate in rates.values()), rates
    assert in_distribution <= 0.05


def test_calibration_of_another_modality_is_refused(cxr_bundle, oct_root, tmp_path):
    out = tmp_path / "m.onnx"
    result = fedbridge("export", "onnx", cxr_bundle, "--out", out, "--val-data", oct_root)
    assert_one_line_error(result, "--val-data", "CNV", "not labels of this model")
    assert not out.exists()
    # OCT scans filed under the CXR model's own label names: the model cannot label them
    labels = json.loads((cxr_bundle / "model.json").read_text())["spec"]["labels"]
    disguised = tmp_path / "disguised"
    for i, path in enumerate(list_images([oct_root])[::4]):
        folder = disguised / labels[i % len(labels)]
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(path, folder / path.name)
    result = fedbridge("export", "onnx", cxr_bundle, "--out", out, "--val-data", disguised)
    assert_one_line_error(
        result, "--val-data", "correctly", "not images of the modality", "not learnt"
    )
    assert not out.exists()
    one_label = tmp_path / "one-label"
    (one_label / labels[0]).mkdir(parents=True)
    for path in list_images([oct_root])[:25]:
        os.symlink(path, one_label / labels[0] / path.name)
    result = fedbridge("export", "onnx", cxr_bundle, "--out", out, "--val-data", one_label)
    assert_one_line_error(result, "--val-data", "one label only", "at least two")
    assert not out.exists()


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _bar(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """The colour bar's middle column and the image height, from the layout constants."""
    h = rgb.shape[0] - overlay.HEADER - overlay.FOOTER
    x = rgb.shape[1] - overlay.BAR + 14 + 7
    y0, height = overlay.HEADER + 16, overlay.colour_bar_height(h)
    return rgb[y0 : y0 + height, x], h


def test_overlay_shows_verdict_colour_bar_and_withholds_the_map_when_ood(
    edge_onnx, cxr_parts, noise_png
):
    predictor = Predictor(edge_onnx)
    cxr = next(
        p
        for p in map(predictor.predict_file, list_images([cxr_parts["test"]])[:20])
        if not p.ood and p.record.cam_label is not None
    )  # an assessed image whose class gets a map (not NORMAL)
    rgb = _png(cxr.overlay_png())
    assert tuple(rgb[2, 2]) == overlay.OK_BAND
    column, h = _bar(rgb)
    lut = overlay.colour_lut()
    np.testing.assert_array_equal(column[0], lut[255])  # the reference value at the top
    np.testing.assert_array_equal(column[-1], lut[0])
    assert len({tuple(c) for c in column}) > 100  # a ramp, not a block
    footer = rgb[-overlay.FOOTER :, :200]
    assert (footer > 200).any() and (footer < 60).any()  # the research-use text is drawn
    image = rgb[overlay.HEADER : overlay.HEADER + h, : cxr.grey.shape[1]].astype(int)
    assert (np.ptp(image, axis=2) > 3).mean() > 0.2  # heat is drawn (colour over grey)

    ood = predictor.predict_file(noise_png)
    assert ood.ood and ood.cam is None
    rgb = _png(ood.overlay_png())
    assert tuple(rgb[2, 2]) == overlay.OOD_BAND
    h = rgb.shape[0] - overlay.HEADER - overlay.FOOTER
    image = rgb[overlay.HEADER : overlay.HEADER + h, :256].astype(int)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    column, _ = _bar(rgb)
    assert not any(tuple(c) == tuple(lut[255]) for c in column)  # no colour scale shown


def test_colour_scale_is_fixed_per_model_not_per_image(edge_onnx, cxr_parts):
    predictor = Predictor(edge_onnx)
    reference = predictor.meta.edge["cam"]["reference"]
    assert reference > 0 and predictor.style.reference == reference
    cam = np.array([[0.0, reference / 4], [reference / 2, reference * 3]], dtype=np.float32)
    unit = overlay.cam_to_unit(cam, (2, 2), reference)
    np.testing.assert_allclose(unit, [[0.0, 0.25], [0.5, 1.0]])
    weak = overlay.cam_to_unit(cam / 10, (2, 2), reference)
    assert weak.max() == pytest.approx(0.3)  # a weak map stays weak (per-image max: 1.0)
