"""Input-level out-of-distribution test: does this image look like the calibration images at all?

The feature-space score (``ood.py``) is only as good as the model: a tiny or weak model maps
random noise close to a class mean. This test looks at the pixels alone, so it does not depend on
the model: a 41-number fingerprint of each greyscale image (intensity histogram, a 4×4 layout of
mean intensities, gradient direction and strength, left-right and top-bottom symmetry, aspect
ratio) and a Mahalanobis distance to the calibration images' fingerprints. A chest X-ray has a
dark background at the sides, bright mediastinum, near left-right symmetry and mostly vertical
edges; an OCT B-scan is dark with bright horizontal layers; noise has huge high-frequency energy;
a rotated or inverted chest X-ray breaks the layout. Fitted at export (``ood.fit_inputs``), run at
the bedside with numpy and OpenCV only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

SIZE = 64
BINS = 16
GRID = 4
NAMES = (
    *(f"hist_{i}" for i in range(BINS)),
    "mean",
    "std",
    *(f"grid_{r}{c}" for r in range(GRID) for c in range(GRID)),
    "grad_x",
    "grad_y",
    "grad_log_ratio",
    "laplacian",
    "asym_left_right",
    "asym_top_bottom",
    "log_aspect",
)


def features(grey: np.ndarray) -> np.ndarray:
    """The fingerprint of one greyscale uint8 image (H, W) as float64 (len(NAMES),)."""
    h, w = grey.shape
    small = cv2.resize(grey, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float64) / 255
    hist = np.histogram(small, bins=BINS, range=(0.0, 1.0))[0] / small.size
    grid = small.reshape(GRID, SIZE // GRID, GRID, SIZE // GRID).mean(axis=(1, 3)).ravel()
    gx = np.abs(cv2.Sobel(small, cv2.CV_64F, 1, 0, ksize=3)).mean()
    gy = np.abs(cv2.Sobel(small, cv2.CV_64F, 0, 1, ksize=3)).mean()
    lap = np.abs(cv2.Laplacian(small, cv2.CV_64F)).mean()
    return np.concatenate(
        [
            np.sqrt(hist),  # square root: a bin's count is closer to Gaussian on this scale
            [small.mean(), small.std()],
            grid,
            np.log([gx + 1e-3, gy + 1e-3, (gx + 1e-3) / (gy + 1e-3), lap + 1e-3]),
            np.log([np.abs(small - small[:, ::-1]).mean() + 1e-3]),
            np.log([np.abs(small - small[::-1]).mean() + 1e-3]),
            [np.log(w / h)],
        ]
    )


def _array(record: dict[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    value = np.asarray(record[key], dtype=np.float64)
    if value.shape != shape or not np.isfinite(value).all():
        raise ValueError(f"input test field {key!r}: expected finite values of shape {shape}")
    return value


@dataclass(frozen=True)
class InputTest:
    """Two tests on the fingerprint, both learnt from the calibration images at export.

    ``distance``: squared Mahalanobis distance to the calibration fingerprints (mean over
    features): other modalities, noise, blank images, photos. ``orientation``: a linear
    classifier that tells the calibration images from the same images rotated by 90°, 180°,
    270° and inverted (negative film): orientation and polarity mistakes. Each has a threshold
    at a high percentile of out-of-fold scores of the calibration images.
    """

    mean: np.ndarray
    whiten: np.ndarray
    distance_threshold: float
    scale_mean: np.ndarray
    scale_std: np.ndarray
    coef: np.ndarray
    intercept: float
    orientation_threshold: float

    def scores(self, fingerprints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance, orientation) score per row of ``fingerprints`` (N, len(NAMES))."""
        f = np.atleast_2d(fingerprints)
        g = (f - self.mean) @ self.whiten
        z = (f - self.scale_mean) / self.scale_std
        return (g**2).mean(1), z @ self.coef + self.intercept

    def check(self, grey: np.ndarray) -> tuple[str | None, dict[str, float]]:
        """The reason this image is out of distribution (None if it passes) and its scores."""
        distance, orientation = (float(s[0]) for s in self.scores(features(grey)))
        values = {"input_distance": distance, "input_orientation": orientation}
        if distance > self.distance_threshold:
            return (
                f"the image's pixel statistics are unlike the calibration images (distance "
                f"{distance:.2f} > {self.distance_threshold:.2f}): another modality, a blank "
                "or corrupted image?",
                values,
            )
        if orientation > self.orientation_threshold:
            return (
                f"the image looks rotated or inverted compared with the calibration images "
                f"(score {orientation:.2f} > {self.orientation_threshold:.2f})",
                values,
            )
        return None, values

    def to_json(self) -> dict[str, Any]:
        return {
            "features": list(NAMES),
            "mean": self.mean.tolist(),
            "whiten": self.whiten.tolist(),
            "distance_threshold": self.distance_threshold,
            "scale_mean": self.scale_mean.tolist(),
            "scale_std": self.scale_std.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "orientation_threshold": self.orientation_threshold,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> InputTest:
        """Parse the record written at export; ValueError when it is not this version's."""
        if list(record.get("features", [])) != list(NAMES):
            raise ValueError("input fingerprint features differ from this fedbridge version's")
        d = len(NAMES)
        return cls(
            mean=_array(record, "mean", (d,)),
            whiten=_array(record, "whiten", (d, d)),
            distance_threshold=float(record["distance_threshold"]),
            scale_mean=_array(record, "scale_mean", (d,)),
            scale_std=_array(record, "scale_std", (d,)),
            coef=_array(record, "coef", (d,)),
            intercept=float(record["intercept"]),
            orientation_threshold=float(record["orientation_threshold"]),
        )


def transformed(grey: np.ndarray) -> list[np.ndarray]:
    """The negatives the orientation test learns from: rotations by 90°, 180°, 270°; inverted."""
    return [np.rot90(grey, k).copy() for k in (1, 2, 3)] + [255 - grey]
