"""Evaluation metrics reported by Carr, Sami & Sanderson, with bootstrap confidence intervals.

The paper reports accuracy, per-class sensitivity and F1, the class-averaged sensitivity and F1
with their standard deviation across classes, the macro one-vs-rest ROC AUC and the confusion
matrix. :func:`compute_metrics` computes all of them (point estimates with scikit-learn) plus a
seeded percentile-bootstrap confidence interval for the headline numbers, and returns a plain
JSON-serialisable dict. :func:`format_metrics_table` renders that dict with rich.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Group
from rich.table import Table
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from fedbridge_shared import defaults

__all__ = [
    "CI_METRICS",
    "PER_CLASS_CI",
    "calibration",
    "compute_metrics",
    "format_metrics_table",
    "headline_table",
    "per_class_table",
    "confusion_table",
    "ovr_auc",
    "validate_predictions",
    "wilson_interval",
]

#: The metrics that get a bootstrap confidence interval, in display order.
CI_METRICS: tuple[str, ...] = ("accuracy", "macro_auc", "sensitivity_mean", "f1_mean")
#: The per-class values that get a bootstrap interval (from the same resamples).
PER_CLASS_CI: tuple[str, ...] = ("sensitivity", "specificity")
#: Equal-width confidence bins of the reliability diagram and its ECE.
CALIBRATION_BINS = 10

# Resamples are processed in chunks so that the (chunk, N) weight matrix stays around 32 MB.
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def validate_predictions(
    y_true: Any, probs: Any, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Check and normalise ``(y_true, probs, labels)``; raise ``ValueError`` if unusable.

    Returns ``y_true`` as a 1-D int64 array of class indices in ``[0, K)``, ``probs`` as a
    float64 ``(N, K)`` array of finite scores, and ``labels`` as a list of ``K`` unique strings.
    Integral floats in ``y_true`` (e.g. read back from JSON) are accepted.
    """
    if isinstance(labels, str):
        raise ValueError("labels must be a sequence of class names, not a single string")
    label_list = [str(label) for label in labels]
    k = len(label_list)
    if k < 2:
        raise ValueError(f"need at least 2 class labels, got {k}")
    if len(set(label_list)) != k:
        raise ValueError(f"class labels must be unique, got {label_list}")

    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty: no samples to evaluate")
    integral_floats = (
        y.dtype.kind == "f" and bool(np.all(np.isfinite(y))) and bool(np.all(y == np.round(y)))
    )
    if y.dtype.kind not in "iub" and not integral_floats:
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(
            f"y_true must hold class indices in [0, {k}) for {k} labels, "
            f"got values in [{y.min()}, {y.max()}]"
        )

    p = np.asarray(probs)
    if p.dtype.kind not in "iuf":
        raise ValueError(f"probs must be numeric, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, K), got shape {p.shape}")
    if p.shape != (y.shape[0], k):
        raise ValueError(
            f"probs must have shape (N, K) = ({y.shape[0]}, {k}) to match y_true and labels, "
            f"got {p.shape}"
        )
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    return y, p, label_list


def _float_or_none(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def ovr_auc(y: np.ndarray, p: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """One-vs-rest ROC AUC of each class in ``classes`` (each must have positives and negatives).

    Uses sklearn's multilabel-indicator form, which computes exactly what
    ``roc_auc_score(y, p, multi_class="ovr", average=None)`` does per class but does not require
    the scores to sum to 1 and works on a subset of the classes.
    """
    classes = list(classes)
    indicator = (y[:, None] == np.asarray(classes)[None, :]).astype(np.int64)
    return np.asarray(roc_auc_score(indicator, p[:, classes], average=None), dtype=np.float64)


def _bootstrap_auc_numerators(
    weights: np.ndarray, scores: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mann-Whitney AUC pieces of one class for every resample, given per-sample multiplicities.

    ``weights`` is ``(B, N)``: how often each original sample occurs in each resample. The ROC
    AUC equals P(score_pos > score_neg) + 0.5 P(score_pos == score_neg) over all (pos, neg)
    pairs of the resample, which is what sklearn's trapezoidal ROC AUC computes. Returns
    ``(numerator, n_pos, n_neg)``, each of shape ``(B,)``; AUC = numerator / (n_pos * n_neg).
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w_sorted = weights[:, order]
    pos_sorted = positive[order]
    w_pos = np.add.reduceat(w_sorted * pos_sorted, starts, axis=1)  # (B, G) per tie group
    w_neg = np.add.reduceat(w_sorted * ~pos_sorted, starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg  # negatives with a strictly lower score
    numerator = np.sum(w_pos * (neg_below + 0.5 * w_neg), axis=1)
    return numerator, w_pos.sum(axis=1), w_neg.sum(axis=1)


def _resample_stats(
    y: np.ndarray, p: np.ndarray, y_pred: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Headline metrics of each resample, given ``weights`` (B, N): each image's multiplicity.

    Confusion counts of a resample are weighted sums over the original images, so every metric
    is a matrix product. Class averages use the classes present in the resample (as the point
    estimate does); macro AUC is NaN in a resample with fewer than 2 classes present. Per-class
    ``sensitivity``/``specificity`` are ``(B, K)``, NaN where the resample lacks positives /
    negatives of that class.
    """
    k = p.shape[1]
    true_onehot = np.eye(k)[y]  # (N, K)
    pred_onehot = np.eye(k)[y_pred]
    correct = (y == y_pred).astype(np.float64)

    total = weights.sum(axis=1)
    support = weights @ true_onehot  # (B, K)
    tp = weights @ (true_onehot * correct[:, None])
    predicted = weights @ pred_onehot
    present = support > 0
    n_present = present.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(present, tp / support, 0.0)
        f1 = np.where(present, 2.0 * tp / (support + predicted), 0.0)

    auc_sum = np.zeros(weights.shape[0])
    for c in range(k):
        numerator, n_pos, n_neg = _bootstrap_auc_numerators(weights, p[:, c], y == c)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc_sum += np.where((n_pos > 0) & (n_neg > 0), numerator / (n_pos * n_neg), 0.0)
    negatives = total[:, None] - support
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class_sens = np.where(present, tp / support, np.nan)
        specificity = np.where(negatives > 0, (negatives - (predicted - tp)) / negatives, np.nan)
        return {
            "sensitivity": per_class_sens,
            "specificity": specificity,
            "accuracy": weights @ correct / total,
            "macro_auc": np.where(n_present >= 2, auc_sum / n_present, np.nan),
            "sensitivity_mean": sensitivity.sum(axis=1) / n_present,
            "f1_mean": f1.sum(axis=1) / n_present,
        }


def _bootstrap(
    y: np.ndarray, p: np.ndarray, y_pred: np.ndarray, n_bootstrap: int, seed: int
) -> dict[str, np.ndarray]:
    """Headline metrics on ``n_bootstrap`` resamples (with replacement) of the N images.

    Each resample is represented by the multiplicity of every original image, drawn from
    Multinomial(N, 1/N): the same distribution as drawing N indices with replacement. A
    statistic that is undefined in a resample (macro AUC with fewer than 2 classes present) is
    NaN there and is left out of the percentile interval.
    """
    n, k = p.shape
    rng = np.random.default_rng(seed)
    out = {name: np.empty(n_bootstrap) for name in CI_METRICS}
    out |= {name: np.empty((n_bootstrap, k)) for name in PER_CLASS_CI}
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
        stats = _resample_stats(y, p, y_pred, weights)
        for name in (*CI_METRICS, *PER_CLASS_CI):
            out[name][start : start + b] = stats[name]
    return out


def _percentile(values: np.ndarray, alpha: float) -> list[float] | None:
    """The ``[alpha, 1 - alpha]`` quantiles of the finite ``values``, or None if there are none."""
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def cross_entropy(y_true: Any, probs: Any) -> float:
    """Mean cross-entropy −log p(true class) of probabilities (p clipped at 1e-12)."""
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson score interval of a proportion ``k / n`` (scipy's ``binomtest``); None when
    ``n`` is 0."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [max(0.0, float(ci.low)), min(1.0, float(ci.high))]


def calibration(y_true: Any, probs: Any, n_bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Top-label reliability: confidence (max probability) against accuracy in equal bins.

    Returns ``{"ece", "n_bins", "bins"}``; each bin is ``{lo, hi, n, confidence, accuracy}``
    (``None`` for an empty bin). The expected calibration error is
    ``ECE = sum_b n_b / N * |accuracy_b - confidence_b|``: 0 when every bin's accuracy equals
    its mean confidence, 1 when every prediction is wrong with confidence 1. Bins are
    ``(lo, hi]`` (the first also holds 0).
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if p.ndim != 2 or p.shape[0] != y.shape[0] or not y.size:
        raise ValueError(f"probs {p.shape} do not match y_true {y.shape}")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mine = which == b
        count = int(mine.sum())
        conf = float(confidence[mine].mean()) if count else None
        acc = float(correct[mine].mean()) if count else None
        if acc is not None and conf is not None:  # count > 0
            ece += count / y.size * abs(acc - conf)
        bins.append(
            {"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": count,
             "confidence": conf, "accuracy": acc}
        )  # fmt: skip
    return {"ece": float(ece), "n_bins": int(n_bins), "bins": bins}


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    n_bootstrap: int = defaults.BOOTSTRAP,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Compute the paper's evaluation metrics for one test set.

    Args:
        y_true: ``(N,)`` true class indices in ``[0, K)``.
        probs: ``(N, K)`` class scores (softmax probabilities); ``y_pred = argmax(probs)``
            (ties go to the lowest index). Only their ranking matters for AUC, so they need not
            sum to 1.
        labels: the ``K`` class names, in index order.
        n_bootstrap: number of bootstrap resamples of the N images (0 skips the bootstrap; the
            intervals are then ``None``).
        seed: seed of the bootstrap generator; the same inputs and seed give the same intervals.
        ci: confidence level of the percentile intervals, in (0, 1).

    Returns:
        A JSON-serialisable dict (plain ``int``/``float``/``str``/``list``/``dict``/``None``):

        - ``labels``, ``n``, ``accuracy``.
        - ``macro_auc``: mean one-vs-rest ROC AUC (sklearn ``roc_auc_score``) over the classes
          present in ``y_true``, listed in ``auc_classes``; ``None`` if fewer than 2 are present.
          With every class present this equals ``roc_auc_score(y, probs, multi_class="ovr")``.
        - ``per_class``: label -> ``{sensitivity, specificity, precision, f1, auc, support}``.
          A value whose denominator is zero is ``None``: sensitivity when support is 0,
          specificity when every image is of that class, precision when the class is never
          predicted, F1 when the class is neither present nor predicted, AUC when the class is
          absent or fewer than 2 classes are present. A present class that is never predicted
          has F1 = 0 (sklearn's ``2TP / (2TP + FP + FN)``).
        - ``sensitivity_mean``/``sensitivity_sd`` and ``f1_mean``/``f1_sd``: mean and
          *population* standard deviation (``ddof=0``) of the per-class values across the
          classes present in ``y_true``. ``ddof=0`` because the classes are the whole set of
          interest, not a sample of classes; it describes the spread across these classes.
          Classes with zero support are excluded and listed in ``absent_classes``.
          ``sensitivity_mean`` is sklearn's balanced accuracy / macro recall over present
          classes.
        - ``confusion_matrix``: ``K x K`` list of lists, rows = true, columns = predicted.
        - ``ci95``: metric -> ``[low, high]`` percentile bootstrap interval at level ``ci`` for
          ``accuracy``, ``macro_auc``, ``sensitivity_mean`` and ``f1_mean``; ``None`` when no
          resample defines the metric or ``n_bootstrap`` is 0. Each resample draws N images
          with replacement; class averages in a resample use the classes present in it, and a
          resample with fewer than 2 classes has no macro AUC (left out of that interval).
        - ``per_class_ci95``: label -> ``{sensitivity: [low, high], specificity: [...]}``
          from the same resamples (``None`` where no resample defines the value).
        - ``calibration``: :func:`calibration` of the predictions (reliability bins, ECE).
        - ``bootstrap``: ``{n_resamples, seed, ci, method, n_valid}`` describing the intervals.

    Raises:
        ValueError: empty input, shape mismatch, ``probs`` not ``(N, K)``, labels out of range,
            non-finite scores, or invalid bootstrap settings.
    """
    y, p, label_list = validate_predictions(y_true, probs, labels)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)):
        raise ValueError(f"n_bootstrap must be an integer, got {n_bootstrap!r}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")

    n, k = p.shape
    class_ids = list(range(k))
    y_pred = np.argmax(p, axis=1)

    cm = confusion_matrix(y, y_pred, labels=class_ids)
    accuracy = float(accuracy_score(y, y_pred))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, y_pred, labels=class_ids, average=None, zero_division=np.nan
    )

    present = [c for c in class_ids if support[c] > 0]
    absent = [c for c in class_ids if support[c] == 0]

    auc_per_class: dict[int, float] = {}
    macro_auc: float | None = None
    auc_classes: list[int] = []
    if len(present) >= 2:
        auc_classes = present
        aucs = ovr_auc(y, p, present)
        auc_per_class = dict(zip(present, aucs.tolist(), strict=True))
        macro_auc = float(np.mean(aucs))

    per_class: dict[str, dict[str, Any]] = {}
    for c in class_ids:
        tp = int(cm[c, c])
        fp = int(cm[:, c].sum()) - tp
        negatives = n - int(support[c])
        tn = negatives - fp
        per_class[label_list[c]] = {
            "sensitivity": _float_or_none(recall[c]),
            "specificity": tn / negatives if negatives > 0 else None,
            "precision": _float_or_none(precision[c]),
            "f1": _float_or_none(f1[c]),
            "auc": auc_per_class.get(c),
            "support": int(support[c]),
        }

    sens_present = np.asarray([recall[c] for c in present], dtype=np.float64)
    f1_present = np.asarray([f1[c] for c in present], dtype=np.float64)

    ci95: dict[str, list[float] | None] = {name: None for name in CI_METRICS}
    n_valid = {name: 0 for name in CI_METRICS}
    class_ci: dict[str, dict[str, list[float] | None]] = {
        label: {name: None for name in PER_CLASS_CI} for label in label_list
    }
    if n_bootstrap > 0:
        samples = _bootstrap(y, p, y_pred, int(n_bootstrap), int(seed))
        alpha = (1.0 - float(ci)) / 2.0
        for name in CI_METRICS:
            n_valid[name] = int(np.isfinite(samples[name]).sum())
            ci95[name] = _percentile(samples[name], alpha)
        for c, label in enumerate(label_list):
            for name in PER_CLASS_CI:
                class_ci[label][name] = _percentile(samples[name][:, c], alpha)

    return {
        "labels": label_list,
        "n": int(n),
        "accuracy": accuracy,
        "macro_auc": macro_auc,
        "auc_classes": [label_list[c] for c in auc_classes],
        "sensitivity_mean": float(np.mean(sens_present)),
        "sensitivity_sd": float(np.std(sens_present, ddof=0)),
        "f1_mean": float(np.mean(f1_present)),
        "f1_sd": float(np.std(f1_present, ddof=0)),
        "absent_classes": [label_list[c] for c in absent],
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "ci95": ci95,
        "per_class_ci95": class_ci,
        "calibration": calibration(y, p),
        "bootstrap": {
            "n_resamples": int(n_bootstrap),
            "seed": int(seed),
            "ci": float(ci),
            "method": "percentile",
            "n_valid": n_valid,
        },
    }


# --------------------------------------------------------------------------------------------
# rich rendering


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_ci(interval: Sequence[float] | None, digits: int = 4) -> str:
    if interval is None:
        return "–"
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def headline_table(metrics: dict[str, Any]) -> Table:
    """The headline numbers (value, across-class SD where the paper gives one, and the CI)."""
    level = metrics.get("bootstrap", {}).get("ci", 0.95)
    n_resamples = metrics.get("bootstrap", {}).get("n_resamples")
    caption = f"n = {metrics['n']} images"
    if n_resamples:
        caption += f"; {level:.0%} percentile bootstrap CI, {n_resamples} resamples"
    if metrics.get("absent_classes"):
        caption += f"; absent from test set: {', '.join(metrics['absent_classes'])}"
    table = Table(title="Evaluation", caption=caption)
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    table.add_column("SD across classes", justify="right")
    table.add_column(f"{level:.0%} CI", justify="right")
    ci95 = metrics.get("ci95", {})
    rows = [
        ("Accuracy", "accuracy", None),
        ("Macro AUC (one-vs-rest)", "macro_auc", None),
        ("Mean sensitivity", "sensitivity_mean", "sensitivity_sd"),
        ("Mean F1", "f1_mean", "f1_sd"),
    ]
    for title, key, sd_key in rows:
        sd = _fmt(metrics.get(sd_key)) if sd_key else ""
        table.add_row(title, _fmt(metrics.get(key)), sd, _fmt_ci(ci95.get(key)))
    return table


def per_class_table(metrics: dict[str, Any]) -> Table:
    """One row per class: sensitivity, specificity, precision, F1, AUC and support."""
    table = Table(title="Per class")
    table.add_column("Class")
    for name in ("Sensitivity", "Specificity", "Precision", "F1", "AUC", "Support"):
        table.add_column(name, justify="right")
    for label in metrics["labels"]:
        row = metrics["per_class"][label]
        table.add_row(
            label,
            _fmt(row["sensitivity"]),
            _fmt(row["specificity"]),
            _fmt(row["precision"]),
            _fmt(row["f1"]),
            _fmt(row["auc"]),
            str(row["support"]),
        )
    return table


def confusion_table(metrics: dict[str, Any]) -> Table:
    """The confusion matrix: rows are true classes, columns predicted classes."""
    table = Table(title="Confusion matrix (rows: true, columns: predicted)")
    table.add_column("true \\ pred")
    for label in metrics["labels"]:
        table.add_column(label, justify="right")
    for label, row in zip(metrics["labels"], metrics["confusion_matrix"], strict=True):
        table.add_row(label, *(str(count) for count in row))
    return table


def format_metrics_table(metrics: dict[str, Any]) -> Group:
    """The headline, per-class and confusion-matrix tables, as one rich renderable.

    Print it with ``rich.console.Console().print(format_metrics_table(metrics))``. The three
    tables are also available on their own as :func:`headline_table`, :func:`per_class_table`
    and :func:`confusion_table`.
    """
    return Group(headline_table(metrics), per_class_table(metrics), confusion_table(metrics))
