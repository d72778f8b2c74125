"""Out-of-distribution score: class-conditional Mahalanobis distance of the pooled features.

Measured on ../shared/data (see the README): logit scores (energy, max-softmax) of a small CXR
model flag 0 % of random-noise and natural-photo inputs, the feature distance flags all of them.
The distance is computed inside the graph (two matmuls and a min, TensorRT friendly):
``score = min_k ||(f - mu_k) L||² / C`` with ``L Lᵀ`` the inverse of a shrunk shared covariance.
The threshold is a percentile of out-of-fold scores on validation images, so the images the
Gaussians were fitted on do not make the threshold too tight.

Fitting happens at export time (scikit-learn's Ledoit-Wolf); the bedside only runs the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbridge_edge.errors import EdgeError

MIN_IMAGES = 20
DEFAULT_PERCENTILE = 95.0


@dataclass(frozen=True)
class Gaussians:
    """Whitened class means (K, C) and the whitening matrix L (C, C)."""

    means: np.ndarray
    whiten: np.ndarray

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis score per row of ``features`` (N, C), as computed in the graph."""
        g = features.astype(np.float64) @ self.whiten
        d = ((g[:, None, :] - self.means[None]) ** 2).sum(-1)
        return d.min(1) / features.shape[1]


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
) -> tuple[Gaussians, float, dict]:
    """Fit on all validation features; threshold = ``percentile`` of out-of-fold scores."""
    if len(features) < MIN_IMAGES:
        raise EdgeError(
            f"OOD calibration needs at least {MIN_IMAGES} validation images, got {len(features)}; "
            "pass --val with more held-out images of the trained modality"
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
