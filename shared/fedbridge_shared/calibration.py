"""Temperature scaling (Guo et al., 2017): one scalar T with ``p = softmax(logits / T)``.

T is fitted by minimising the mean negative log-likelihood of held-out labels over ``log T``
(bounded Brent, :data:`T_MIN` … :data:`T_MAX`). Dividing every logit by the same T never changes
the argmax, so accuracy, sensitivity and the ranking AUC are untouched; only how confident the
scores are changes. ``T > 1`` softens an over-confident model, ``T < 1`` sharpens an
under-confident one. The calibration error is the top-label ECE of
:func:`fedbridge_shared.metrics.calibration` (equal-width bins).

The NLL is convex in ``1 / T`` (a log-sum-exp of a linear function), so it has one minimum in
``log T`` and the bounded search finds it deterministically.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedbridge_shared.metrics import CALIBRATION_BINS, calibration

__all__ = [
    "T_MAX",
    "T_MIN",
    "ece",
    "fit_temperature",
    "nll",
    "softmax",
    "temperature_record",
]

T_MIN = 0.05
T_MAX = 20.0
#: A fitted T this close (relative) to a bound is the search running into it, not a minimum.
_BOUND_RTOL = 1e-3
_LOG_T_XATOL = 1e-7
_FLAT_NLL = 1e-12


def _check(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0]:
        raise ValueError(
            f"temperature scaling needs logits (N, K) and labels (N,), got {z.shape} and {y.shape}"
        )
    if not y.size:
        raise ValueError("temperature scaling needs at least one labelled image, got none")
    if z.shape[1] < 2:
        raise ValueError(f"temperature scaling needs at least 2 classes, got {z.shape[1]}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {z.shape[1]}), got {y[:5]}…")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity; cannot fit a temperature")
    present = np.unique(y)
    if present.size < 2:
        raise ValueError(
            f"temperature scaling needs labelled images of at least 2 classes, got class "
            f"{int(present[0])} only (one class cannot tell confidence from accuracy)"
        )
    return z, y.astype(np.int64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` row-wise, in float64."""
    probs: np.ndarray = np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / temperature))
    return probs


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z, y = _check(logits, labels)
    return float(-_log_softmax(z / temperature)[np.arange(y.size), y].mean())


def ece(
    logits: Any, labels: Any, temperature: float = 1.0, n_bins: int = CALIBRATION_BINS
) -> float:
    """Top-label expected calibration error of ``softmax(logits / temperature)``."""
    z, y = _check(logits, labels)
    return float(calibration(y, softmax(z, temperature), n_bins)["ece"])


def fit_temperature(logits: Any, labels: Any) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL of ``labels``; deterministic.

    Raises ``ValueError`` for empty input, labels of one class only, non-finite logits, or when
    the minimum lies at a bound (e.g. every image classified correctly: the NLL then keeps
    falling as T → 0, and no finite temperature is supported by the data).
    """
    from scipy.optimize import minimize_scalar

    z, y = _check(logits, labels)
    rows = np.arange(y.size)

    def objective(log_t: float) -> float:
        return float(-_log_softmax(z * math.exp(-log_t))[rows, y].mean())

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    found = minimize_scalar(
        objective, bounds=(lo, hi), method="bounded", options={"xatol": _LOG_T_XATOL}
    )
    t = float(math.exp(found.x))
    if not math.isfinite(t) or not found.success:
        raise ValueError(f"temperature fit failed ({found.message}); got T = {t}")
    at_bound = t <= T_MIN * (1 + _BOUND_RTOL) or t >= T_MAX * (1 - _BOUND_RTOL)
    # a bound no worse than the minimum found: the NLL is flat there (e.g. it underflows to 0)
    flat = min(objective(lo), objective(hi)) <= found.fun + _FLAT_NLL
    if at_bound or flat:
        raise ValueError(
            f"fitted temperature {t:.3g} runs into the allowed range [{T_MIN:g}, {T_MAX:g}]: the "
            f"{y.size} labelled images do not support a finite temperature (e.g. all classified "
            "correctly, or the model no better than chance); use more held-out images"
        )
    return t


def temperature_record(logits: Any, labels: Any, n_bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Fit T and measure ECE / NLL before and after on the same images (in-sample figures)."""
    z, y = _check(logits, labels)
    t = fit_temperature(z, y)
    return {
        "method": "temperature",
        "temperature": t,
        "images": int(y.size),
        "ece_bins": int(n_bins),
        "ece_before": ece(z, y, 1.0, n_bins),
        "ece_after": ece(z, y, t, n_bins),
        "nll_before": nll(z, y, 1.0),
        "nll_after": nll(z, y, t),
    }
