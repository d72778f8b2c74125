"""One assessment pipeline: ``evaluate --out`` loads, scans, reads, decodes and plots once.

Every fedbridge module's reference to the counted function is wrapped, so a second call from
anywhere (a re-scan for the report, a re-decode for the saliency grid, a re-plot through a
temp file) shows in the count. Real images from ../shared/data, the session's real bundle.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from inproc import run

import fedbridge.cli.stages  # noqa: F401  (imported before wrapping: its names are counted)
import fedbridge_shared.assessment  # noqa: F401
import fedbridge_shared.explain.grid  # noqa: F401
import fedbridge_shared.html_report  # noqa: F401
from fedbridge_shared import engine, models, report, spec
from fedbridge_shared.data import samples, tensors
from fedbridge_shared.data.samples import scan_folder

PER_LABEL = 8


def _count(monkeypatch, module, name: str) -> list[int]:
    """Wrap ``module.name``, and wherever a fedbridge module holds it; returns the call log."""
    original = getattr(module, name)
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("fedbridge") and (
            getattr(mod, name, None) is original
        ):
            monkeypatch.setattr(mod, name, counted)
    return calls


@pytest.fixture(scope="module")
def small_test(cxr_parts, data_root, tmp_path_factory) -> Path:
    """32 real test films (8 per class) with a MANIFEST.csv giving patients and sources."""
    with (data_root / "MANIFEST.csv").open(newline="") as fh:
        team = {(data_root / r["path"]).resolve(): r for r in csv.DictReader(fh)}
    root = tmp_path_factory.mktemp("assess") / "test"
    rows = []
    index = scan_folder(cxr_parts["test"])
    for label in index.labels:
        for s in index.by_label(label)[:PER_LABEL]:
            (root / label).mkdir(parents=True, exist_ok=True)
            os.symlink(s.path.resolve(), root / label / s.path.name)
            row = team[s.path.resolve()]
            rows.append((f"{label}/{s.path.name}", label, row["patient_id"], row["source_dataset"]))
    with (root / "MANIFEST.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "patient_id", "source_dataset"), *rows])
    return root


def test_evaluate_out_does_each_step_once(capsys, monkeypatch, cxr_bundle, small_test, tmp_path):
    n = len(list(small_test.glob("*/*")))
    assert n == 4 * PER_LABEL
    loads = _count(monkeypatch, spec, "load_bundle")
    builds = _count(monkeypatch, models, "model_from_bundle")
    scans = _count(monkeypatch, samples, "scan_folder")
    manifests = _count(monkeypatch, csv, "DictReader")  # every CSV read, wherever
    decodes = _count(monkeypatch, tensors, "load_resized")
    confusion = _count(monkeypatch, report, "confusion_figure")
    roc = _count(monkeypatch, report, "roc_figure")
    second_pass = _count(monkeypatch, engine, "predict")
    out = tmp_path / "report"

    result = run(capsys, "evaluate", cxr_bundle, small_test, "--out", out, "--bootstrap", "20")

    assert result.returncode == 0, result.stderr
    counts = {
        "load_bundle": len(loads), "model_from_bundle": len(builds), "scan_folder": len(scans),
        "manifest": len(manifests), "decode": len(decodes),
        "confusion": len(confusion), "roc": len(roc), "predict": len(second_pass),
    }  # fmt: skip
    assert counts == {
        "load_bundle": 1, "model_from_bundle": 1, "scan_folder": 1, "manifest": 1,
        "decode": n, "confusion": 1, "roc": 1, "predict": 0,
    }  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == n
    assert metrics["shortcut"]["sources_known"] == n
    html = (out / "report.html").read_text()
    for png in ("confusion_matrix.png", "roc.png"):  # the files are the embedded figures
        assert base64.b64encode((out / png).read_bytes()).decode() in html
    assert '<section id="saliency">' in html


def test_one_pass_features_are_the_models_pooled_features(cxr_bundle, small_test):
    """The probabilities and features of the one pass equal a plain forward and timm's own
    pre-logits features (what the shortcut audit used to compute in a second pass)."""
    import torch
    from rich.console import Console

    from fedbridge_shared.assessment import assess, predict_with_features
    from fedbridge_shared.data.tensors import make_loader

    result = assess(
        cxr_bundle, small_test, n_bootstrap=0, device="cpu", console=Console(quiet=True)
    )
    loader = make_loader(result.images, [0] * len(result.images), result.bundle.spec, batch_size=8)
    probs, feats = predict_with_features(result.model, loader, torch.device("cpu"))
    x = torch.cat([batch for batch, _ in loader])
    with torch.no_grad():
        plain = torch.softmax(result.model(x), dim=1).double().numpy()
        pooled = result.model.forward_head(result.model.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(probs, plain, rtol=0, atol=1e-6)
    np.testing.assert_allclose(feats, pooled.double().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.probs_all, probs, rtol=0, atol=1e-6)
    assert feats.shape == (len(result.images), result.metrics["shortcut"]["probe"]["features"])
    predictions = result.predictions
    assert [p.sample for p in predictions] == list(result.index.samples)
    assert [p.predicted for p in predictions] == [
        result.bundle.spec.labels[k] for k in probs.argmax(1)
    ]
