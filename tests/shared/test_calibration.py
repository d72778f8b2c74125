"""Temperature scaling: known answers on synthetic logits whose labels are drawn from softmax(z).

Tolerance: T is a maximum-likelihood estimate. With ``p = softmax(β·x)`` the Fisher information
of ``β = 1/T`` is ``I = Σ_i Var_{p_i}(x_{i,y})`` (the variance, under the model's own
probabilities, of the logit of the drawn class), so ``SE(β) = 1/√I`` and by the delta method
``SE(T) = T²·SE(β)``. The tests require the fit within 4 standard errors of the true T (a correct
fit misses that by chance with probability ~6e-5 for any seed; the seed is fixed anyway), and
check that this bound is tight (a few percent of T) so the test is not vacuous.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedbridge_shared.calibration import (
    T_MAX,
    T_MIN,
    ece,
    fit_temperature,
    nll,
    softmax,
    temperature_record,
)
from fedbridge_shared.metrics import calibration


def _calibrated(n: int = 20_000, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z): z is perfectly calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, k))
    p = softmax(z)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z, np.minimum(y, k - 1)


def _se_of_t(x: np.ndarray, t: float) -> float:
    """Standard error of the fitted T at the true T (Fisher information, delta method)."""
    p = softmax(x, t)
    var = (p * x**2).sum(1) - (p * x).sum(1) ** 2
    return t**2 / np.sqrt(var.sum())


@pytest.mark.parametrize("scale", [3.0, 1.0, 0.5])
def test_fitted_temperature_recovers_the_known_scale(scale):
    z, y = _calibrated()
    x = scale * z  # softmax(x / scale) is calibrated: the true T is `scale`
    t = fit_temperature(x, y)
    se = _se_of_t(x, scale)
    assert se < 0.03 * scale  # the bound below is tight, not vacuous
    assert abs(t - scale) <= 4 * se, (t, scale, se)


def test_fit_is_deterministic_and_minimises_the_nll():
    z, y = _calibrated(n=2000, seed=1)
    x = 2.5 * z
    t = fit_temperature(x, y)
    assert fit_temperature(x, y) == t
    best = nll(x, y, t)
    for other in (t * 0.97, t * 1.03, 1.0):
        assert nll(x, y, other) > best


def test_ece_falls_on_overconfident_logits():
    z, y = _calibrated()
    x = 3.0 * z
    t = fit_temperature(x, y)
    before, after = ece(x, y), ece(x, y, t)
    assert after <= before
    assert before > 0.1 and after < 0.02  # overconfident by 3×, then calibrated
    assert ece(z, y) < 0.02  # the calibrated logits themselves


def test_ece_is_metrics_calibration_of_the_tempered_softmax():
    z, y = _calibrated(n=500, seed=2)
    expected = calibration(y, softmax(z / 2.0))["ece"]
    assert ece(z, y, 2.0) == pytest.approx(expected, abs=1e-12)


def test_record_fields():
    z, y = _calibrated(n=3000, seed=3)
    r = temperature_record(3.0 * z, y)
    assert r["method"] == "temperature" and r["images"] == 3000 and r["ece_bins"] == 10
    assert r["ece_after"] <= r["ece_before"] and r["nll_after"] <= r["nll_before"]
    assert r["ece_after"] == pytest.approx(ece(3.0 * z, y, r["temperature"]))


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "at least one labelled image"),
        (np.random.default_rng(0).normal(size=(50, 3)), np.ones(50, dtype=int), "at least 2 cl"),
        (np.zeros((4, 1)), np.zeros(4, dtype=int), "at least 2 classes"),
        (np.zeros((4, 3)), np.array([0, 1, 2]), "logits (N, K) and labels (N,)"),
        (np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]), "NaN or infinity"),
        (np.zeros((2, 3)), np.array([0, 3]), "class indices in [0, 3)"),
    ],
)
def test_refuses_bad_input(logits, labels, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):  # fmt: skip
        fit_temperature(logits, labels)


def test_refuses_a_temperature_at_the_bound():
    # every image correct with a margin: the NLL keeps falling as T -> 0
    z = np.array([[5.0, 0.0], [0.0, 5.0]] * 20)
    y = np.array([0, 1] * 20)
    with pytest.raises(ValueError, match="runs into the allowed range"):
        fit_temperature(z, y)
    # logits that carry no information: any T gives the same NLL
    with pytest.raises(ValueError, match="runs into the allowed range"):
        fit_temperature(np.zeros((40, 3)), np.arange(40) % 3)
    assert T_MIN < 1 < T_MAX
