"""Temperature scaling sealed into the exported ONNX (issue #27), on the small real CXR bundle."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cli import assert_one_line_error, fedbridge, ok

from fedbridge_edge.modelfile import OUTPUTS, read_edge_model
from fedbridge_edge.preprocess import list_images
from fedbridge_shared.calibration import ece, fit_temperature, nll

CALIBRATION_KEYS = {
    "method", "temperature", "images", "data", "ece_bins", "ece_before", "ece_after",
    "nll_before", "nll_after", "in_sample", "applies",
}  # fmt: skip


@pytest.fixture(scope="module")
def calibrated(cxr_bundle, cxr_parts, tmp_path_factory):
    """The bundle exported with --val-data through the CLI: (onnx path, stdout)."""
    out = tmp_path_factory.mktemp("calibrated") / "model.onnx"
    result = ok("export", "onnx", cxr_bundle, "--out", out, "--val-data", cxr_parts["val"])
    return out, result.stdout


def _torch_logits(bundle_path, paths):
    """The fp32 PyTorch logits export fits T on, recomputed from the bundle."""
    from fedbridge_edge.export import _features, _load_images, _torch_model
    from fedbridge_edge.preprocess import InputSpec

    bundle, model = _torch_model(bundle_path)
    x, _ = _load_images(paths, InputSpec.from_spec(bundle.spec.to_dict()))
    return _features(model, x)[1]


def test_val_data_export_seals_the_fitted_temperature(calibrated, cxr_bundle, cxr_parts):
    path, stdout = calibrated
    edge = read_edge_model(path)
    c = edge.edge["calibration"]
    assert set(c) == CALIBRATION_KEYS
    assert c["method"] == "temperature" and c["in_sample"] is True
    assert np.isfinite(c["temperature"]) and 0.05 < c["temperature"] < 20
    paths = list_images([cxr_parts["val"]])
    assert c["images"] == len(paths) == edge.edge["ood"]["n_val"]
    y = np.array([edge.labels.index(p.parent.name) for p in paths])
    logits = _torch_logits(cxr_bundle, paths)
    t = fit_temperature(logits, y)
    assert c["temperature"] == pytest.approx(t, rel=1e-9)
    assert c["ece_before"] == pytest.approx(ece(logits, y), abs=1e-12)
    assert c["ece_after"] == pytest.approx(ece(logits, y, t), abs=1e-12)
    assert c["nll_before"] == pytest.approx(nll(logits, y), abs=1e-12)
    assert c["nll_after"] == pytest.approx(nll(logits, y, t), abs=1e-12)
    assert c["nll_after"] <= c["nll_before"]  # T minimises the NLL on these images (T=1 included)
    line = next(ln for ln in stdout.splitlines() if ln.startswith("calibrated: temperature"))
    assert f"T={c['temperature']:.3f}" in line
    assert f"ECE {c['ece_before']:.3f} → {c['ece_after']:.3f}" in line and "in-sample" in line


def test_onnxruntime_logits_give_the_same_temperature(calibrated, cxr_parts):
    """The bedside graph's logits (preprocessed by the runtime's own loader) agree on T."""
    import onnxruntime as ort

    from fedbridge_edge.preprocess import InputSpec, load

    path, _ = calibrated
    edge = read_edge_model(path)
    paths = list_images([cxr_parts["val"]])
    spec = InputSpec.from_spec(edge.spec)
    x = np.stack([load(p, spec)[0] for p in paths]).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run([OUTPUTS[0]], {"input": x})[0]
    y = np.array([edge.labels.index(p.parent.name) for p in paths])
    assert fit_temperature(logits, y) == pytest.approx(
        edge.edge["calibration"]["temperature"], rel=1e-3
    )


def test_without_val_data_the_scores_are_marked_uncalibrated(cxr_bundle, tmp_path):
    out = tmp_path / "plain.onnx"
    result = ok("export", "onnx", cxr_bundle, "--out", out)  # OOD falls back to training data
    c = read_edge_model(out).edge["calibration"]
    assert c["method"] == "none" and c["temperature"] is None and "--val-data" in c["reason"]
    assert "scores NOT calibrated (no --val-data)" in result.stdout


def test_unsupported_temperature_is_a_one_line_error_and_nothing_is_written(
    cxr_bundle, cxr_parts, calibrated, tmp_path
):
    """Held-out images the model gets all right: the NLL falls as T → 0, no T is supported."""
    import onnxruntime as ort

    from fedbridge_edge.preprocess import InputSpec, load

    edge = read_edge_model(calibrated[0])
    spec = InputSpec.from_spec(edge.spec)
    session = ort.InferenceSession(str(calibrated[0]), providers=["CPUExecutionProvider"])
    right: dict[str, list] = {}
    for p in list_images([cxr_parts["test"], cxr_parts["train"]]):
        logits = session.run([OUTPUTS[0]], {"input": load(p, spec)[0][None].astype(np.float32)})
        if edge.labels[int(logits[0].argmax())] == p.parent.name:
            right.setdefault(p.parent.name, []).append(p)
    two = sorted(right, key=lambda k: -len(right[k]))[:2]
    assert len(two) == 2 and all(len(right[k]) >= 12 for k in two)
    val = tmp_path / "all-right"
    for label in two:
        (val / label).mkdir(parents=True)
        for p in right[label][:12]:  # 24: the OOD test needs 20
            os.symlink(p, val / label / p.name)
    out = tmp_path / "refused.onnx"
    result = fedbridge("export", "onnx", cxr_bundle, "--out", out, "--val-data", val)
    assert_one_line_error(result, "cannot calibrate the scores", "temperature")
    assert not out.exists()
