"""Evaluation report files: ``metrics.json``, a confusion-matrix plot and a one-vs-rest ROC plot.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot's global
figure manager, so no GUI backend is needed or selected and nothing leaks between calls. Every
file is written atomically: to a temporary file in the destination folder, then ``os.replace``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay, roc_curve

from fedbridge_shared import rounds as R
from fedbridge_shared.colours import series_colour, site_colours
from fedbridge_shared.files import atomic_write
from fedbridge_shared.metrics import ovr_auc, validate_predictions

__all__ = [
    "DPI",
    "assessment_figures",
    "confusion_figure",
    "plot_confusion_matrix",
    "history_figure",
    "plot_history",
    "plot_reliability",
    "plot_roc",
    "plot_site_rounds",
    "roc_figure",
    "write_metrics",
]

DPI = 120


def _save_png(png: bytes, path: Path) -> Path:
    return atomic_write(Path(path), lambda handle: handle.write(png))


def plot_confusion_matrix(metrics: dict[str, Any], path: Path) -> Path:
    """:func:`confusion_figure` as a PNG at ``path``; returns ``path``."""
    return _save_png(_png(confusion_figure(metrics)), path)


def plot_roc(y_true: Any, probs: Any, labels: Sequence[str], path: Path) -> Path:
    """:func:`roc_figure` as a PNG at ``path``; returns ``path``."""
    return _save_png(_png(roc_figure(y_true, probs, labels)), path)


CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc.png"
METRICS_JSON = "metrics.json"


def assessment_figures(
    metrics: Mapping[str, Any], y_true: Any, probs: Any, labels: Sequence[str] | None = None
) -> dict[str, bytes]:
    """The confusion matrix and ROC plots of one assessment as PNG bytes, each rendered once:
    ``{"confusion_matrix": …, "roc": …}`` (the files :func:`write_metrics` writes and the
    figures the HTML report embeds). ``labels`` default to ``metrics["labels"]``."""
    names = list(metrics["labels"] if labels is None else labels)
    return {
        "confusion_matrix": _png(confusion_figure(metrics)),
        "roc": _png(roc_figure(y_true, probs, names)),
    }


def confusion_figure(metrics: Mapping[str, Any]) -> Figure:
    """The figure of ``metrics["confusion_matrix"]``.

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
    return fig


def roc_figure(y_true: Any, probs: Any, labels: Sequence[str]) -> Figure:
    """One-vs-rest ROC curve of each class with its AUC in the legend.

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
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _x_key(rows: Sequence[Mapping[str, Any]]) -> str:
    return R.ROUND if any(R.ROUND in r for r in rows) else "epoch"


def plot_history(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """:func:`history_figure` as PNG bytes."""
    return _png(history_figure(rows))


def history_figure(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Loss and accuracy against ``round`` (federated) or ``epoch`` (central).

    Each series keeps one colour in both panels and in every report (``colours.series_colour``);
    the x axis ticks at whole rounds/epochs only.
    """
    x_key = _x_key(rows)
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, int | float)})
    fig = Figure(figsize=(8, 3.4))
    axes = fig.subplots(1, 2)
    for ax, suffix in zip(axes, ("loss", "accuracy"), strict=True):
        for key in (k for k in keys if k.endswith("_" + suffix)):
            pts = [(r[x_key], r[key]) for r in rows if r.get(key) is not None and x_key in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                label = key.removesuffix("_" + suffix).replace("_", " ")
                ax.plot(xs, ys, marker="o", color=series_colour(key), label=label)
        _axes_style(ax, x_key, suffix)
    fig.tight_layout()
    return fig


def plot_site_rounds(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Each site's validation loss and accuracy of the global model per round (``per_site``)."""
    names = sorted({n for r in rows for n in (r.get(R.PER_SITE) or {})})
    colours = site_colours(names)
    fig = Figure(figsize=(8, 3.4))
    axes = fig.subplots(1, 2)
    for ax, suffix in zip(axes, ("loss", "accuracy"), strict=True):
        for name in names:
            pts = [
                (r[R.ROUND], r[R.PER_SITE][name][f"val_{suffix}"])
                for r in rows
                if (r.get(R.PER_SITE) or {}).get(name, {}).get("val_examples")
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", color=colours[name], label=name)
        _axes_style(ax, "round", f"site validation {suffix}")
    fig.tight_layout()
    return _png(fig)


def _axes_style(ax: Axes, x_label: str, y_label: str) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_reliability(cal: Mapping[str, Any]) -> bytes:
    """Reliability diagram of :func:`fedbridge_shared.metrics.calibration`, with its ECE.

    Top: accuracy of each confidence bin against the diagonal of perfect calibration (bars
    below it are over-confident); bottom: how many predictions fall in each bin.
    """
    bins = [b for b in cal["bins"] if b["n"]]
    width = 1.0 / cal["n_bins"]
    fig = Figure(figsize=(5.5, 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
    top.bar(
        [b["lo"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
        color=series_colour("test"), alpha=0.75, edgecolor="white", label="accuracy in bin",
    )  # fmt: skip
    top.plot(
        [b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black",
        markersize=3, label="bin's mean confidence",
    )  # fmt: skip
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability (top-label), ECE = {cal['ece']:.3f}")
    top.legend(fontsize=8, loc="upper left")
    top.grid(True, alpha=0.3)
    bottom.bar([b["lo"] for b in bins], [b["n"] for b in bins], width=width, align="edge",
               color="#57606a")  # fmt: skip
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=3))
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (highest class probability)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    return _png(fig)


def write_metrics(
    metrics: dict[str, Any],
    out_dir: Path,
    y_true: Any,
    probs: Any,
    *,
    figures: Mapping[str, bytes] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``confusion_matrix.png`` and ``roc.png`` into ``out_dir``.

    ``metrics`` is the dict from :func:`fedbridge_shared.metrics.compute_metrics` for the same
    ``y_true`` and ``probs`` (checked: same ``n`` and number of labels). ``figures``: the PNGs
    of :func:`assessment_figures` when already rendered (else they are rendered here).
    ``metrics.json`` is written last, so its presence means the plots are complete. Each file
    is replaced atomically. Returns ``{"metrics": ..., "confusion_matrix": ..., "roc": ...}``.
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
    pngs = figures if figures is not None else assessment_figures(metrics, y, p)
    confusion_path = _save_png(pngs["confusion_matrix"], out_dir / CONFUSION_PNG)
    roc_path = _save_png(pngs["roc"], out_dir / ROC_PNG)
    metrics_path = atomic_write(out_dir / METRICS_JSON, lambda handle: handle.write(payload))
    return {"metrics": metrics_path, "confusion_matrix": confusion_path, "roc": roc_path}
