"""Tests of fedbridge_shared.report: PNG plots and atomically written metrics.json."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from fedbridge_shared.metrics import compute_metrics
from fedbridge_shared.report import plot_confusion_matrix, plot_roc, write_metrics

LABELS = ["normal", "bacterial pneumonia", "viral pneumonia", "covid-19"]
EXPECTED_FILES = {"metrics.json", "confusion_matrix.png", "roc.png"}


def problem(seed: int = 0, n: int = 120, k: int = 4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def assert_real_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert width > 100 and height > 100
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, "image is (nearly) one flat colour"
    assert pixels.std() > 5


def test_write_metrics_writes_three_valid_files(tmp_path):
    y, probs = problem()
    metrics = compute_metrics(y, probs, LABELS, n_bootstrap=200)
    out_dir = tmp_path / "run" / "eval"  # created on demand
    paths = write_metrics(metrics, out_dir, y, probs)

    assert set(paths) == {"metrics", "confusion_matrix", "roc"}
    assert paths["metrics"] == out_dir / "metrics.json"
    assert paths["confusion_matrix"] == out_dir / "confusion_matrix.png"
    assert paths["roc"] == out_dir / "roc.png"
    assert {p.name for p in out_dir.iterdir()} == EXPECTED_FILES  # no stray temp files
    assert_real_png(paths["confusion_matrix"])
    assert_real_png(paths["roc"])

    text = paths["metrics"].read_text(encoding="utf-8")
    assert text.startswith('{\n  "labels"')  # indent 2
    assert json.loads(text) == metrics


def test_files_get_normal_permissions(tmp_path):
    y, probs = problem()
    metrics = compute_metrics(y, probs, LABELS, n_bootstrap=0)
    paths = write_metrics(metrics, tmp_path, y, probs)
    for path in paths.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_metrics_overwrites_previous_run(tmp_path):
    y, probs = problem(1)
    first = compute_metrics(y, probs, LABELS, n_bootstrap=0)
    write_metrics(first, tmp_path, y, probs)
    y2, probs2 = problem(2, n=60)
    second = compute_metrics(y2, probs2, LABELS, n_bootstrap=0)
    paths = write_metrics(second, tmp_path, y2, probs2)
    assert json.loads(paths["metrics"].read_text())["n"] == 60
    assert {p.name for p in tmp_path.iterdir()} == EXPECTED_FILES


def test_failed_write_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch):
    y, probs = problem()
    metrics = compute_metrics(y, probs, LABELS, n_bootstrap=0)
    paths = write_metrics(metrics, tmp_path, y, probs)
    before = paths["confusion_matrix"].read_bytes()

    def broken_savefig(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        write_metrics(metrics, tmp_path, y, probs)
    assert paths["confusion_matrix"].read_bytes() == before
    assert {p.name for p in tmp_path.iterdir()} == EXPECTED_FILES


def test_write_metrics_rejects_mismatched_predictions(tmp_path):
    y, probs = problem(n=50)
    metrics = compute_metrics(y, probs, LABELS, n_bootstrap=0)
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="50"):
        write_metrics(metrics, out_dir, y[:40], probs[:40])
    with pytest.raises(ValueError, match="shape"):
        write_metrics(metrics, out_dir, y, probs[:, :3])
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_absent_class_is_skipped_in_roc(tmp_path):
    y, probs = problem(3)
    y[y == 3] = 0  # "covid-19" absent from the test set
    metrics = compute_metrics(y, probs, LABELS, n_bootstrap=100)
    assert metrics["absent_classes"] == ["covid-19"]
    paths = write_metrics(metrics, tmp_path, y, probs)
    assert_real_png(paths["roc"])
    assert_real_png(paths["confusion_matrix"])
    assert json.loads(paths["metrics"].read_text()) == metrics


def test_roc_with_a_single_class_present_still_plots(tmp_path):
    y = np.ones(10, dtype=int)
    probs = np.random.default_rng(0).dirichlet(np.ones(2), size=10)
    path = plot_roc(y, probs, ["neg", "pos"], tmp_path / "roc.png")
    assert path == tmp_path / "roc.png"
    assert_real_png(path)


def test_plot_confusion_matrix_standalone(tmp_path):
    y, probs = problem(4, k=2)
    metrics = compute_metrics(y, probs, ["negative", "positive"], n_bootstrap=0)
    path = plot_confusion_matrix(metrics, tmp_path / "sub" / "cm.png")
    assert path == tmp_path / "sub" / "cm.png"
    assert_real_png(path)
    assert os.listdir(tmp_path / "sub") == ["cm.png"]


def test_plot_confusion_matrix_rejects_inconsistent_metrics(tmp_path):
    metrics = {"labels": ["a", "b", "c"], "confusion_matrix": [[1, 0], [0, 1]], "accuracy": 1.0}
    with pytest.raises(ValueError, match="shape"):
        plot_confusion_matrix(metrics, tmp_path / "cm.png")
    assert not any(tmp_path.iterdir())


def test_plots_do_not_register_pyplot_figures(tmp_path):
    y, probs = problem(5)
    metrics = compute_metrics(y, probs, LABELS, n_bootstrap=0)
    write_metrics(metrics, tmp_path, y, probs)
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []


def test_history_ticks_whole_rounds_and_keeps_each_series_colour():
    from fedbridge_shared.colours import series_colour
    from fedbridge_shared.report import history_figure

    rows = [
        {"round": r, "train_loss": 1 / r, "train_accuracy": 0.2 * r, "server_val_loss": 0.9,
         "federated_val_loss": 0.8 / r, "federated_val_accuracy": 0.1 * r}
        for r in (1, 2, 3, 4, 5, 6)
    ]  # fmt: skip
    fig = history_figure(rows)
    fig.canvas.draw()
    loss, acc = fig.axes
    for ax in (loss, acc):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    colours = {ax: {ln.get_label(): ln.get_color() for ln in ax.get_lines()} for ax in (loss, acc)}
    # loss has server val too (so a per-axis colour cycle would shift); colours still agree
    assert set(colours[loss]) == {"train", "server val", "federated val"}
    for name in ("train", "federated val"):
        assert colours[loss][name] == colours[acc][name] == series_colour(name.replace(" ", "_"))
    assert len(set(colours[loss].values())) == 3
