"""Evaluation report files: ``metrics.json``, a confusion-matrix plot and a one-vs-rest ROC plot.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot's global
figure manager, so no GUI backend is needed or selected and nothing leaks between calls. Every
file is written atomically: to a temporary file in the destination folder, then ``os.replace``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, roc_curve

from fedbridge_shared.files import atomic_write
from fedbridge_shared.metrics import ovr_auc, validate_predictions

__all__ = ["DPI", "plot_confusion_matrix", "plot_roc", "write_metrics"]

DPI = 120


def _save_figure(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=DPI))


def plot_confusion_matrix(metrics: dict[str, Any], path: Path) -> Path:
    """Plot ``metrics["confusion_matrix"]`` to a PNG at ``path``; returns ``path``.

    Each cell shows the count and its percentage of the true class (row-normalised, so the
    diagonal reads as per-class sensitivity); the colour scale is that row-normalised fraction,
    0 to 1, so rare classes are as readable as common ones.
    """
    labels = list(metrics["labels"])
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    k = len(labels)
    if cm.shape != (k, k):
        raise ValueError(f"confusion_matrix has shape {cm.shape}, expected ({k}, {k})")
    row_totals = cm.sum(axis=1, keepdims=True)
    fraction = np.divide(cm, row_totals, out=np.zeros(cm.shape), where=row_totals > 0)

    side = max(4.5, 1.0 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    display = ConfusionMatrixDisplay(confusion_matrix=fraction, display_labels=labels)
    display.plot(ax=ax, cmap="Blues", colorbar=True, xticks_rotation=45, values_format=".2f")
    display.im_.set_clim(0.0, 1.0)
    display.im_.colorbar.set_label("fraction of true class")
    # Text in the colour of the far end of the colour map, for contrast with the cell.
    low_end, high_end = display.im_.cmap(0.0), display.im_.cmap(1.0)
    for i in range(k):
        for j in range(k):
            text = display.text_[i, j]
            percent = f"{100.0 * fraction[i, j]:.1f}%" if row_totals[i, 0] > 0 else "–"
            text.set_text(f"{cm[i, j]}\n{percent}")
            text.set_color(high_end if fraction[i, j] < 0.5 else low_end)
            text.set_fontsize(9)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
    title = f"Confusion matrix (n = {int(cm.sum())}"
    if metrics.get("accuracy") is not None:
        title += f", accuracy = {metrics['accuracy']:.3f}"
    ax.set_title(title + ")")
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def plot_roc(y_true: Any, probs: Any, labels: Sequence[str], path: Path) -> Path:
    """One-vs-rest ROC curve of each class with its AUC in the legend; returns ``path``.

    Classes absent from ``y_true`` have no ROC curve and are skipped (noted in the legend area);
    the title gives the macro AUC over the classes drawn, as in
    :func:`fedbridge_shared.metrics.compute_metrics`. With fewer than 2 classes present no curve
    is defined and the plot says so.
    """
    y, p, label_list = validate_predictions(y_true, probs, labels)
    present = [c for c in range(len(label_list)) if np.any(y == c)]
    absent = [label_list[c] for c in range(len(label_list)) if c not in present]

    fig = Figure(figsize=(6.5, 6.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    if len(present) >= 2:
        aucs = ovr_auc(y, p, present)
        for c, auc_value in zip(present, aucs, strict=True):
            fpr, tpr, _ = roc_curve(y == c, p[:, c])
            ax.plot(fpr, tpr, linewidth=1.8, label=f"{label_list[c]} (AUC = {auc_value:.3f})")
        title = f"One-vs-rest ROC, macro AUC = {float(np.mean(aucs)):.3f}"
    else:
        title = "One-vs-rest ROC undefined: fewer than 2 classes present"
    if absent:
        ax.plot([], [], linestyle="none", label=f"absent (skipped): {', '.join(absent)}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def write_metrics(
    metrics: dict[str, Any], out_dir: Path, y_true: Any, probs: Any
) -> dict[str, Path]:
    """Write ``metrics.json``, ``confusion_matrix.png`` and ``roc.png`` into ``out_dir``.

    ``metrics`` is the dict from :func:`fedbridge_shared.metrics.compute_metrics` for the same
    ``y_true`` and ``probs`` (checked: same ``n`` and number of labels). ``metrics.json`` is
    written last, so its presence means the plots are complete. Each file is replaced
    atomically. Returns ``{"metrics": ..., "confusion_matrix": ..., "roc": ...}`` paths.
    """
    labels = list(metrics["labels"])
    y, p, _ = validate_predictions(y_true, probs, labels)
    if int(metrics["n"]) != y.shape[0]:
        raise ValueError(
            f"metrics were computed on {metrics['n']} samples but y_true has {y.shape[0]}"
        )
    # Serialise before touching the disk, so a non-JSON value fails without leaving files.
    payload = (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode("utf-8")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    confusion_path = plot_confusion_matrix(metrics, out_dir / "confusion_matrix.png")
    roc_path = plot_roc(y, p, labels, out_dir / "roc.png")
    metrics_path = atomic_write(out_dir / "metrics.json", lambda handle: handle.write(payload))
    return {"metrics": metrics_path, "confusion_matrix": confusion_path, "roc": roc_path}
