"""Tests of fedbridge_shared.metrics: hand-computed oracles, agreement with sklearn, bootstrap."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from rich.console import Console
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)

from fedbridge_shared.metrics import (
    CI_METRICS,
    _resample_stats,
    calibration,
    compute_metrics,
    format_metrics_table,
    ovr_auc,
    wilson_interval,
)

LABELS3 = ["normal", "pneumonia", "covid"]

# A tiny 3-class example small enough to compute every number by hand.
#   sample: true, predicted (argmax), scores
HAND_Y = np.array([0, 0, 0, 1, 1, 1, 2, 2])
HAND_P = np.array(
    [
        [0.8, 0.1, 0.1],  # 0 -> 0
        [0.6, 0.3, 0.1],  # 0 -> 0
        [0.3, 0.5, 0.2],  # 0 -> 1
        [0.1, 0.7, 0.2],  # 1 -> 1
        [0.2, 0.6, 0.2],  # 1 -> 1
        [0.1, 0.3, 0.6],  # 1 -> 2
        [0.1, 0.2, 0.7],  # 2 -> 2
        [0.5, 0.1, 0.4],  # 2 -> 0
    ]
)


def random_problem(seed: int, n: int, k: int, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs, [f"class{i}" for i in range(k)]


# ------------------------------------------------------------------------------------------
# hand-computed oracle


def test_hand_computed_three_class_example():
    m = compute_metrics(HAND_Y, HAND_P, LABELS3, n_bootstrap=200)
    tol = 1e-12

    # confusion matrix rows = true, columns = predicted
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert m["n"] == 8
    assert m["labels"] == LABELS3
    assert m["accuracy"] == pytest.approx(5 / 8, abs=tol)

    pc = m["per_class"]
    # sensitivity = TP / support
    assert pc["normal"]["sensitivity"] == pytest.approx(2 / 3, abs=tol)
    assert pc["pneumonia"]["sensitivity"] == pytest.approx(2 / 3, abs=tol)
    assert pc["covid"]["sensitivity"] == pytest.approx(1 / 2, abs=tol)
    # specificity = TN / (TN + FP): normal 4/5, pneumonia 4/5, covid 5/6
    assert pc["normal"]["specificity"] == pytest.approx(4 / 5, abs=tol)
    assert pc["pneumonia"]["specificity"] == pytest.approx(4 / 5, abs=tol)
    assert pc["covid"]["specificity"] == pytest.approx(5 / 6, abs=tol)
    # precision = TP / predicted: 2/3, 2/3, 1/2
    assert pc["normal"]["precision"] == pytest.approx(2 / 3, abs=tol)
    assert pc["pneumonia"]["precision"] == pytest.approx(2 / 3, abs=tol)
    assert pc["covid"]["precision"] == pytest.approx(1 / 2, abs=tol)
    # F1 = 2TP / (2TP + FP + FN): 4/6, 4/6, 2/4
    assert pc["normal"]["f1"] == pytest.approx(2 / 3, abs=tol)
    assert pc["pneumonia"]["f1"] == pytest.approx(2 / 3, abs=tol)
    assert pc["covid"]["f1"] == pytest.approx(1 / 2, abs=tol)
    assert [pc[label]["support"] for label in LABELS3] == [3, 3, 2]

    # mean 11/18; deviations 1/18, 1/18, -2/18 -> population variance 6/(324*3) = 1/162
    assert m["sensitivity_mean"] == pytest.approx(11 / 18, abs=tol)
    assert m["sensitivity_sd"] == pytest.approx(math.sqrt(1 / 162), abs=tol)
    assert m["sensitivity_sd"] == pytest.approx(math.sqrt(2) / 18, abs=tol)
    assert m["f1_mean"] == pytest.approx(11 / 18, abs=tol)
    assert m["f1_sd"] == pytest.approx(math.sqrt(2) / 18, abs=tol)

    # one-vs-rest AUC by counting (positive, negative) pairs, ties count 1/2:
    #   normal: positives .8 .6 .3 vs negatives .1 .2 .1 .1 .5 -> 5 + 5 + 4 = 14 of 15
    #   pneumonia: .7 .6 .3 vs .1 .3 .5 .2 .1 -> 5 + 5 + 3.5 = 13.5 of 15
    #   covid: .7 .4 vs .1 .1 .2 .2 .2 .6 -> 6 + 5 = 11 of 12
    assert pc["normal"]["auc"] == pytest.approx(14 / 15, abs=tol)
    assert pc["pneumonia"]["auc"] == pytest.approx(0.9, abs=tol)
    assert pc["covid"]["auc"] == pytest.approx(11 / 12, abs=tol)
    assert m["macro_auc"] == pytest.approx(11 / 12, abs=tol)  # (56 + 54 + 55) / 180
    assert m["auc_classes"] == LABELS3
    assert m["absent_classes"] == []


def test_population_sd_not_sample_sd():
    m = compute_metrics(HAND_Y, HAND_P, LABELS3, n_bootstrap=0)
    sens = [m["per_class"][label]["sensitivity"] for label in LABELS3]
    assert m["sensitivity_sd"] == pytest.approx(float(np.std(sens, ddof=0)), abs=1e-15)
    assert m["sensitivity_sd"] != pytest.approx(float(np.std(sens, ddof=1)), abs=1e-6)


# ------------------------------------------------------------------------------------------
# agreement with sklearn


@pytest.mark.parametrize(("seed", "n", "k"), [(0, 50, 2), (1, 200, 4), (2, 97, 5), (3, 30, 3)])
def test_agrees_with_sklearn_on_random_data(seed, n, k):
    y, probs, labels = random_problem(seed, n, k)
    assert len(np.unique(y)) == k  # every class present in these draws
    m = compute_metrics(y, probs, labels, n_bootstrap=50, seed=seed)
    y_pred = probs.argmax(axis=1)
    tol = 1e-12

    assert m["accuracy"] == pytest.approx(accuracy_score(y, y_pred), abs=tol)
    assert m["confusion_matrix"] == confusion_matrix(y, y_pred).tolist()

    precision, recall, f1, support = precision_recall_fscore_support(y, y_pred, average=None)
    report = classification_report(
        y, y_pred, labels=range(k), target_names=labels, output_dict=True, zero_division=0
    )
    if k == 2:  # sklearn takes binary problems as a single score column
        per_class_auc = [roc_auc_score(y == c, probs[:, c]) for c in range(2)]
    else:
        per_class_auc = roc_auc_score(y, probs, multi_class="ovr", average=None)
    for i, label in enumerate(labels):
        row = m["per_class"][label]
        assert row["sensitivity"] == pytest.approx(recall[i], abs=tol)
        assert row["sensitivity"] == pytest.approx(report[label]["recall"], abs=tol)
        assert row["precision"] == pytest.approx(report[label]["precision"], abs=tol)
        assert row["f1"] == pytest.approx(f1[i], abs=tol)
        assert row["f1"] == pytest.approx(report[label]["f1-score"], abs=tol)
        assert row["support"] == support[i] == report[label]["support"]
        assert row["auc"] == pytest.approx(per_class_auc[i], abs=tol)
        negatives = y != i
        specificity = recall_score(negatives, y_pred != i)  # TN / (TN + FP)
        assert row["specificity"] == pytest.approx(specificity, abs=tol)

    assert m["sensitivity_mean"] == pytest.approx(recall_score(y, y_pred, average="macro"), abs=tol)
    assert m["sensitivity_mean"] == pytest.approx(report["macro avg"]["recall"], abs=tol)
    assert m["sensitivity_sd"] == pytest.approx(np.std(recall), abs=tol)
    assert m["f1_mean"] == pytest.approx(f1_score(y, y_pred, average="macro"), abs=tol)
    assert m["f1_mean"] == pytest.approx(report["macro avg"]["f1-score"], abs=tol)
    assert m["f1_sd"] == pytest.approx(np.std(f1), abs=tol)
    if k == 2:  # both one-vs-rest AUCs equal the binary AUC when rows sum to 1
        assert m["macro_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=tol)
    else:
        expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
        assert m["macro_auc"] == pytest.approx(expected, abs=tol)


def test_auc_does_not_need_probabilities_that_sum_to_one():
    y, probs, labels = random_problem(5, 120, 3)
    logits = np.log(probs) + 7.0  # same ranking within each column, rows do not sum to 1
    m_probs = compute_metrics(y, probs, labels, n_bootstrap=0)
    m_logits = compute_metrics(y, logits, labels, n_bootstrap=0)
    assert m_logits["macro_auc"] == pytest.approx(m_probs["macro_auc"], abs=1e-12)
    assert m_logits["accuracy"] == m_probs["accuracy"]


def test_result_is_json_serialisable_plain_python():
    y, probs, labels = random_problem(6, 80, 4)
    m = compute_metrics(y, probs, labels, n_bootstrap=100)
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m
    assert type(m["n"]) is int
    assert type(m["accuracy"]) is float
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)
    assert set(m["ci95"]) == set(CI_METRICS)


# ------------------------------------------------------------------------------------------
# edge cases


def test_perfect_classifier():
    y = np.array([0, 1, 2, 3] * 10)
    probs = np.eye(4)[y] * 0.9 + 0.025
    m = compute_metrics(y, probs, list("abcd"), n_bootstrap=300, seed=1)
    assert m["accuracy"] == 1.0
    assert m["macro_auc"] == 1.0
    assert m["sensitivity_mean"] == 1.0
    assert m["sensitivity_sd"] == 0.0
    assert m["f1_mean"] == 1.0
    assert m["f1_sd"] == 0.0
    for name in CI_METRICS:
        assert m["ci95"][name] == [1.0, 1.0], name
    assert m["confusion_matrix"] == (np.eye(4, dtype=int) * 10).tolist()


def test_class_absent_from_y_true_but_predicted():
    # "covid" never occurs in y_true but is predicted once (a false positive).
    y = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.6, 0.3, 0.1],
            [0.2, 0.2, 0.6],  # 0 -> 2
            [0.1, 0.8, 0.1],
            [0.3, 0.6, 0.1],
            [0.6, 0.3, 0.1],  # 1 -> 0
        ]
    )
    m = compute_metrics(y, probs, LABELS3, n_bootstrap=200)
    y_pred = probs.argmax(axis=1)
    assert m["absent_classes"] == ["covid"]
    assert m["auc_classes"] == ["normal", "pneumonia"]
    covid = m["per_class"]["covid"]
    assert covid["support"] == 0
    assert covid["sensitivity"] is None
    assert covid["auc"] is None
    assert covid["f1"] == 0.0  # 2TP / (2TP + FP + FN) = 0 / 1
    assert covid["precision"] == 0.0
    assert covid["specificity"] == pytest.approx(5 / 6, abs=1e-12)

    present = [0, 1]
    assert m["sensitivity_mean"] == pytest.approx(
        recall_score(y, y_pred, labels=present, average="macro"), abs=1e-12
    )
    assert m["sensitivity_mean"] == pytest.approx((2 / 3 + 2 / 3) / 2, abs=1e-12)
    assert m["f1_mean"] == pytest.approx(
        f1_score(y, y_pred, labels=present, average="macro"), abs=1e-12
    )
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in present]
    assert m["macro_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert m["confusion_matrix"][2] == [0, 0, 0]
    json.dumps(m, allow_nan=False)


def test_class_absent_and_never_predicted():
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.4, 0.6, 0.0], [0.3, 0.7, 0.0]])
    m = compute_metrics(y, probs, LABELS3, n_bootstrap=50)
    covid = m["per_class"]["covid"]
    assert covid == {
        "sensitivity": None,
        "specificity": 1.0,
        "precision": None,
        "f1": None,
        "auc": None,
        "support": 0,
    }
    # "normal" is predicted once: precision 1, F1 = 2 / (2 + 0 + 1)
    assert m["per_class"]["normal"]["f1"] == pytest.approx(2 / 3, abs=1e-12)


def test_present_class_never_predicted_has_f1_zero_and_undefined_precision():
    y = np.array([0, 0, 1, 1, 2])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4]]
    )
    m = compute_metrics(y, probs, LABELS3, n_bootstrap=0)
    covid = m["per_class"]["covid"]
    assert covid["sensitivity"] == 0.0
    assert covid["precision"] is None
    assert covid["f1"] == 0.0
    y_pred = probs.argmax(axis=1)
    assert m["f1_mean"] == pytest.approx(f1_score(y, y_pred, average="macro"), abs=1e-12)


def test_single_class_present_has_no_auc():
    y = np.array([1, 1, 1, 1])
    probs = np.array([[0.1, 0.9], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    m = compute_metrics(y, probs, ["neg", "pos"], n_bootstrap=100)
    assert m["macro_auc"] is None
    assert m["auc_classes"] == []
    assert m["ci95"]["macro_auc"] is None
    assert m["bootstrap"]["n_valid"]["macro_auc"] == 0
    assert m["accuracy"] == 0.75
    assert m["sensitivity_mean"] == 0.75
    assert m["sensitivity_sd"] == 0.0
    assert m["absent_classes"] == ["neg"]
    assert m["per_class"]["pos"]["specificity"] is None  # no negatives
    json.dumps(m, allow_nan=False)


def test_single_sample():
    m = compute_metrics(np.array([0]), np.array([[0.9, 0.1]]), ["a", "b"], n_bootstrap=20)
    assert m["accuracy"] == 1.0
    assert m["ci95"]["accuracy"] == [1.0, 1.0]
    assert m["macro_auc"] is None


def test_bootstrap_resamples_missing_a_class_do_not_crash():
    # One "covid" image in 12: about a third of resamples miss it entirely.
    y = np.array([0] * 6 + [1] * 5 + [2])
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=12)
    m = compute_metrics(y, probs, LABELS3, n_bootstrap=500, seed=3)
    for name in CI_METRICS:
        low, high = m["ci95"][name]
        assert math.isfinite(low) and math.isfinite(high)
        assert 0.0 <= low <= high <= 1.0
        assert m["bootstrap"]["n_valid"][name] == 500


# ------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_ci_contains_point_estimate_and_is_deterministic():
    y, probs, labels = random_problem(11, 200, 4)
    a = compute_metrics(y, probs, labels, n_bootstrap=1000, seed=7)
    b = compute_metrics(y, probs, labels, n_bootstrap=1000, seed=7)
    c = compute_metrics(y, probs, labels, n_bootstrap=1000, seed=8)
    assert a == b
    assert a["ci95"] != c["ci95"]
    for name in CI_METRICS:
        low, high = a["ci95"][name]
        assert low <= a[name] <= high, name
        assert high - low > 0.0
    assert a["bootstrap"] == {
        "n_resamples": 1000,
        "seed": 7,
        "ci": 0.95,
        "method": "percentile",
        "n_valid": {name: 1000 for name in CI_METRICS},
    }


def test_narrower_level_gives_narrower_interval():
    y, probs, labels = random_problem(12, 150, 3)
    wide = compute_metrics(y, probs, labels, n_bootstrap=400, ci=0.95)["ci95"]["accuracy"]
    narrow = compute_metrics(y, probs, labels, n_bootstrap=400, ci=0.5)["ci95"]["accuracy"]
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_no_bootstrap():
    m = compute_metrics(HAND_Y, HAND_P, LABELS3, n_bootstrap=0)
    assert m["ci95"] == {name: None for name in CI_METRICS}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_resample_stats_match_sklearn_on_each_resample(seed):
    """The bootstrap's matrix-product statistics equal sklearn run on the resampled images."""
    y, probs, _ = random_problem(seed, 40, 4, signal=0.5)
    probs = np.round(probs, 1)  # many tied scores
    y_pred = probs.argmax(axis=1)
    rng = np.random.default_rng(100 + seed)
    # include resamples that drop classes: draw from a few images only
    indices = [rng.integers(0, 40, 40) for _ in range(20)]
    indices += [rng.choice(np.flatnonzero(y <= 1), 40) for _ in range(3)]
    indices += [rng.choice(np.flatnonzero(y == 2), 40)]
    weights = np.stack([np.bincount(idx, minlength=40) for idx in indices]).astype(float)
    stats = _resample_stats(y, probs, y_pred, weights)
    for b, idx in enumerate(indices):
        yb, pb, predb = y[idx], probs[idx], y_pred[idx]
        present = sorted(set(yb.tolist()))
        assert stats["accuracy"][b] == pytest.approx(accuracy_score(yb, predb), abs=1e-12)
        assert stats["sensitivity_mean"][b] == pytest.approx(
            recall_score(yb, predb, labels=present, average="macro"), abs=1e-12
        )
        assert stats["f1_mean"][b] == pytest.approx(
            f1_score(yb, predb, labels=present, average="macro", zero_division=0), abs=1e-12
        )
        if len(present) >= 2:
            expected_auc = float(np.mean(ovr_auc(yb, pb, present)))
            assert stats["macro_auc"][b] == pytest.approx(expected_auc, abs=1e-12)
        else:
            assert math.isnan(stats["macro_auc"][b])


# ------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize(
    ("y", "probs", "labels", "match"),
    [
        (np.array([], dtype=int), np.zeros((0, 3)), LABELS3, "empty"),
        (np.array([0, 1]), np.zeros((3, 3)), LABELS3, "shape"),
        (np.array([0, 1]), np.zeros((2, 2)), LABELS3, "shape"),
        (np.array([0, 1]), np.zeros(2), LABELS3, "2-D"),
        (np.array([0, 1]), np.zeros((2, 3, 1)), LABELS3, "2-D"),
        (np.array([[0, 1]]), np.zeros((2, 3)), LABELS3, "1-D"),
        (np.array([0, 3]), np.zeros((2, 3)), LABELS3, r"\[0, 3\)"),
        (np.array([0, -1]), np.zeros((2, 3)), LABELS3, r"\[0, 3\)"),
        (np.array([0.0, 1.5]), np.zeros((2, 3)), LABELS3, "integer"),
        (np.array(["a", "b"]), np.zeros((2, 3)), LABELS3, "integer"),
        (np.array([0, 1]), np.array([[0.5, np.nan, 0.5], [0.1, 0.2, 0.7]]), LABELS3, "NaN"),
        (np.array([0, 1]), np.array([[0.5, np.inf, 0.5], [0.1, 0.2, 0.7]]), LABELS3, "NaN"),
        (np.array([0, 0]), np.zeros((2, 1)), ["only"], "at least 2"),
        (np.array([0, 1]), np.zeros((2, 2)), ["a", "a"], "unique"),
        (np.array([0, 1]), np.zeros((2, 2)), "ab", "sequence"),
    ],
)
def test_invalid_inputs_raise_value_error(y, probs, labels, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(y, probs, labels, n_bootstrap=10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_bootstrap": -1}, "n_bootstrap"),
        ({"n_bootstrap": 1.5}, "n_bootstrap"),
        ({"ci": 0.0}, "ci"),
        ({"ci": 1.0}, "ci"),
        ({"ci": 95}, "ci"),
    ],
)
def test_invalid_bootstrap_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(HAND_Y, HAND_P, LABELS3, **kwargs)


def test_integral_float_labels_and_lists_are_accepted():
    m = compute_metrics(HAND_Y.astype(float).tolist(), HAND_P.tolist(), LABELS3, n_bootstrap=0)
    assert m["accuracy"] == pytest.approx(5 / 8, abs=1e-12)


# ------------------------------------------------------------------------------------------
# rich table


def render(renderable) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=140, color_system=None).print(renderable)
    return buffer.getvalue()


def test_format_metrics_table_shows_headline_per_class_and_confusion():
    m = compute_metrics(HAND_Y, HAND_P, LABELS3, n_bootstrap=100)
    text = render(format_metrics_table(m))
    for needle in ("Accuracy", "Macro AUC", "Mean sensitivity", "Mean F1", "95% CI"):
        assert needle in text
    for label in LABELS3:
        assert label in text
    assert f"{m['accuracy']:.4f}" in text
    assert f"{m['sensitivity_sd']:.4f}" in text
    low, high = m["ci95"]["accuracy"]
    assert f"[{low:.4f}, {high:.4f}]" in text
    assert "Confusion matrix" in text


def test_format_metrics_table_handles_undefined_values():
    y = np.array([1, 1, 1])
    probs = np.array([[0.1, 0.9], [0.6, 0.4], [0.2, 0.8]])
    m = compute_metrics(y, probs, ["neg", "pos"], n_bootstrap=0)
    text = render(format_metrics_table(m))
    assert "–" in text
    assert "absent from test set: neg" in text


# ------------------------------------------------------------------------------------------
# per-class intervals and calibration


def test_per_class_intervals_come_from_the_same_resamples_as_the_headline():
    """Replaying the bootstrap's draws with sklearn gives the same per-class and headline CIs."""
    y, probs, labels = random_problem(3, 60, 3, signal=1.0)
    m = compute_metrics(y, probs, labels, n_bootstrap=200, seed=7)
    y_pred = probs.argmax(axis=1)
    rng = np.random.default_rng(7)  # the draws compute_metrics made, in the same order
    weights = rng.multinomial(60, np.full(60, 1 / 60), size=200)
    sens, spec, acc = np.full((200, 3), np.nan), np.full((200, 3), np.nan), np.empty(200)
    for b, w in enumerate(weights):
        idx = np.repeat(np.arange(60), w)
        yb, pb = y[idx], y_pred[idx]
        acc[b] = accuracy_score(yb, pb)
        for c in range(3):
            if np.any(yb == c):
                sens[b, c] = np.mean(pb[yb == c] == c)
            if np.any(yb != c):
                spec[b, c] = np.mean(pb[yb != c] != c)
    assert m["ci95"]["accuracy"] == pytest.approx(np.quantile(acc, [0.025, 0.975]).tolist())
    for c, label in enumerate(labels):
        got = m["per_class_ci95"][label]
        s, t = sens[:, c][np.isfinite(sens[:, c])], spec[:, c][np.isfinite(spec[:, c])]
        assert got["sensitivity"] == pytest.approx(np.quantile(s, [0.025, 0.975]).tolist())
        assert got["specificity"] == pytest.approx(np.quantile(t, [0.025, 0.975]).tolist())
        lo, hi = got["sensitivity"]
        assert lo <= m["per_class"][label]["sensitivity"] <= hi and lo < hi


def test_per_class_intervals_of_known_answers():
    """Class 0 always right, class 1 always called 0: sensitivities [1, 1] and [0, 0]."""
    y = np.array([0] * 10 + [1] * 10)
    probs = np.array([[0.9, 0.1]] * 20)
    m = compute_metrics(y, probs, ["a", "b"], n_bootstrap=100)
    assert m["per_class_ci95"]["a"]["sensitivity"] == [1.0, 1.0]
    assert m["per_class_ci95"]["b"]["sensitivity"] == [0.0, 0.0]
    assert m["per_class_ci95"]["a"]["specificity"] == [0.0, 0.0]
    assert m["per_class_ci95"]["b"]["specificity"] == [1.0, 1.0]
    none = compute_metrics(y, probs, ["a", "b"], n_bootstrap=0)["per_class_ci95"]
    assert none == {"a": {"sensitivity": None, "specificity": None}, "b": none["a"]}


def test_ece_of_a_perfectly_calibrated_model_is_about_zero():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 20_000)
    right = rng.random(20_000) < conf  # right exactly as often as it is confident
    y = np.where(right, 0, 1)
    probs = np.stack([conf, 1 - conf], axis=1)
    cal = calibration(y, probs)
    assert cal["ece"] < 0.015 and cal["n_bins"] == 10
    assert sum(b["n"] for b in cal["bins"]) == 20_000
    assert all(b["n"] == 0 for b in cal["bins"][:5])  # no confidence below 0.5 with 2 classes


def test_ece_of_confident_wrong_predictions_is_one_and_hand_computed_bins():
    y = np.array([0, 1, 2, 0])
    wrong = np.eye(3)[[1, 2, 0, 2]]
    assert calibration(y, wrong)["ece"] == pytest.approx(1.0)
    # two at 0.9 (one right), two at 0.6 (both right): ECE = 0.5 * 0.4 + 0.5 * 0.4 = 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    cal = calibration(np.array([0, 1, 1, 1]), probs)
    assert cal["ece"] == pytest.approx(0.4)
    filled = [b for b in cal["bins"] if b["n"]]
    assert [(b["lo"], b["n"], b["accuracy"]) for b in filled] == [
        (pytest.approx(0.5), 2, 1.0),
        (pytest.approx(0.8), 2, 0.5),
    ]
    assert compute_metrics(np.array([0, 1, 1, 1]), probs, ["a", "b"], n_bootstrap=0)["calibration"][
        "ece"
    ] == pytest.approx(0.4)


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx([0.0, 0.1611], abs=1e-4)
    assert wilson_interval(0, 0) is None
