"""Out-of-distribution score: class-conditional Mahalanobis distance of the pooled features.

Measured on ../shared/data (see the README): logit scores (energy, max-softmax) of a small CXR
model flag 0 % of random-noise and natural-photo inputs, the feature distance flags all of them.
The distance is computed inside the graph (two matmuls and a min, TensorRT friendly):
``score = min_k ||(f - mu_k) L||² / C`` with ``L Lᵀ`` the inverse of a shrunk shared covariance.
The threshold is a percentile of out-of-fold scores on validation images, so the images the
Gaussians were fitted on do not make the threshold too tight.

Fitting happens at export time (scikit-learn's Ledoit-Wolf); the bedside only runs the graph.
Beside it, :func:`fit_inputs` learns the model-independent input test of
:mod:`fedbridge_edge.fingerprint` from the same calibration images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbridge_edge import fingerprint
from fedbridge_edge.errors import EdgeError

MIN_IMAGES = 20
DEFAULT_PERCENTILE = 99.0
"""Feature-space threshold. At p95 a real CXR model flagged 11.7 % of unseen patients."""
INPUT_PERCENTILE = 99.0
"""Input-test thresholds: this percentile of out-of-fold calibration scores."""


@dataclass(frozen=True)
class Gaussians:
    """Whitened class means (K, C) and the whitening matrix L (C, C)."""

    means: np.ndarray
    whiten: np.ndarray

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis score per row of ``features`` (N, C), as computed in the graph."""
        g = features.astype(np.float64) @ self.whiten
        d = ((g[:, None, :] - self.means[None]) ** 2).sum(-1)
        scores: np.ndarray = d.min(1) / features.shape[1]
        return scores


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int) -> Gaussians:
    """Class means and a Ledoit-Wolf shrunk shared covariance of ``features`` (N, C)."""
    from sklearn.covariance import LedoitWolf

    f = features.astype(np.float64)
    overall = f.mean(0)
    means = np.stack(
        [f[labels == k].mean(0) if (labels == k).any() else overall for k in range(num_classes)]
    )
    cov = LedoitWolf().fit(f - means[labels]).covariance_
    precision = np.linalg.inv(cov)
    whiten = np.linalg.cholesky((precision + precision.T) / 2)  # precision = L Lᵀ
    return Gaussians(means=means @ whiten, whiten=whiten)


def out_of_fold_scores(
    features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Each image's score under Gaussians fitted on the other folds."""
    order = np.random.default_rng(seed).permutation(len(features))
    scores = np.empty(len(features))
    for held in np.array_split(order, folds):
        rest = np.setdiff1d(order, held)
        scores[held] = fit(features[rest], labels[rest], num_classes).score(features[held])
    return scores


def calibrate(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    percentile: float = DEFAULT_PERCENTILE,
) -> tuple[Gaussians, float, dict[str, Any]]:
    """Fit on all validation features; threshold = ``percentile`` of out-of-fold scores."""
    if len(features) < MIN_IMAGES:
        raise EdgeError(
            f"OOD calibration needs at least {MIN_IMAGES} validation images, got {len(features)}; "
            "pass --val-data with more held-out images of the trained modality"
        )
    if not 50.0 <= percentile < 100.0:
        raise EdgeError(f"--ood-percentile must be in [50, 100), got {percentile}")
    oof = out_of_fold_scores(features, labels, num_classes)
    threshold = float(np.percentile(oof, percentile))
    record = {
        "score": "mahalanobis",
        "threshold": threshold,
        "percentile": percentile,
        "n_val": int(len(features)),
        "val_score_median": float(np.median(oof)),
    }
    return fit(features, labels, num_classes), threshold, record


def _whitening(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and L with L Lᵀ = the inverse of the Ledoit-Wolf covariance of the rows of ``f``."""
    from sklearn.covariance import LedoitWolf

    mean = f.mean(0)
    precision = np.linalg.inv(LedoitWolf().fit(f - mean).covariance_)
    return mean, np.linalg.cholesky((precision + precision.T) / 2)


def fit_inputs(
    greys: list[np.ndarray], *, percentile: float = INPUT_PERCENTILE, folds: int = 5, seed: int = 0
) -> tuple[fingerprint.InputTest, dict[str, Any]]:
    """Learn the input-level test from greyscale calibration images (see ``fingerprint``)."""
    from sklearn.linear_model import LogisticRegression

    if len(greys) < MIN_IMAGES:
        raise EdgeError(f"the input test needs at least {MIN_IMAGES} images, got {len(greys)}")
    pos = np.stack([fingerprint.features(g) for g in greys])
    neg_of = [
        np.stack([fingerprint.features(t) for t in fingerprint.transformed(g)]) for g in greys
    ]
    order = np.random.default_rng(seed).permutation(len(pos))
    oof_distance, oof_orientation = np.empty(len(pos)), np.empty(len(pos))

    def fit(idx: np.ndarray) -> fingerprint.InputTest:
        p, n = pos[idx], np.concatenate([neg_of[i] for i in idx])
        mean, whiten = _whitening(p)
        x = np.concatenate([p, n])
        scale_mean, scale_std = x.mean(0), x.std(0) + 1e-6
        clf = LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced")
        clf.fit((x - scale_mean) / scale_std, np.r_[np.zeros(len(p)), np.ones(len(n))])
        return fingerprint.InputTest(
            mean=mean, whiten=whiten, distance_threshold=np.inf, scale_mean=scale_mean,
            scale_std=scale_std, coef=clf.coef_[0].astype(np.float64),
            intercept=float(clf.intercept_[0]), orientation_threshold=np.inf,
        )  # fmt: skip

    for held in np.array_split(order, folds):
        d, o = fit(np.setdiff1d(order, held)).scores(pos[held])
        oof_distance[held], oof_orientation[held] = d, o
    full = fit(order)
    test = fingerprint.InputTest(
        **{
            **full.__dict__,
            "distance_threshold": float(np.percentile(oof_distance, percentile)),
            "orientation_threshold": float(np.percentile(oof_orientation, percentile)),
        }
    )
    _, own_orientation = test.scores(np.concatenate(neg_of))
    record = {
        "percentile": percentile,
        "n_images": len(greys),
        "distance_threshold": test.distance_threshold,
        "orientation_threshold": test.orientation_threshold,
        "rotated_or_inverted_flagged": float((own_orientation > test.orientation_threshold).mean()),
    }
    return test, record
