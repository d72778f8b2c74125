"""Resize and normalise: the one preprocessing that training and the bedside share.

numpy + OpenCV only (no torch), so ``fedbridge_edge`` reproduces training inputs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from fedbridge_shared.defaults import INTENSITIES

FALLBACK_MEAN = FALLBACK_STD = (0.5, 0.5, 0.5)
"""mean/std of a spec that names none (timm's pretrained configs give the real ones)."""


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: square size, channels and per-channel mean/std."""

    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    intensity: str = "none"
    """Intensity normalisation of the resized greyscale before mean/std (:func:`intensity`)."""

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> InputSpec:
        """From the ``spec`` object of a bundle's model.json."""
        in_chans = int(spec.get("in_chans", 3))
        return cls(
            image_size=int(spec["image_size"]),
            in_chans=in_chans,
            mean=tuple(float(x) for x in spec.get("mean", FALLBACK_MEAN))[:in_chans],
            std=tuple(float(x) for x in spec.get("std", FALLBACK_STD))[:in_chans],
            intensity=str(spec.get("intensity", "none")),
        )


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Greyscale uint8 to ``size`` × ``size`` (area when shrinking, bilinear when enlarging)."""
    interp = cv2.INTER_AREA if min(img.shape) >= size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = (8, 8)


def intensity(img: np.ndarray, method: str) -> np.ndarray:
    """Intensity normalisation of a greyscale uint8 image: ``none`` (as is) or ``clahe``
    (OpenCV's contrast-limited adaptive histogram equalisation, clip 2, 8 × 8 tiles)."""
    if method == "none":
        return img
    if method == "clahe":
        clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILES)
        return clahe.apply(np.ascontiguousarray(img, dtype=np.uint8))
    raise ValueError(f"intensity {method!r}: must be one of {', '.join(INTENSITIES)}")


def normalise(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resized greyscale uint8 (H, W) → float32 (C, H, W): the spec's intensity normalisation,
    then the channel repeated and mean/std applied."""
    x = intensity(img, spec.intensity).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean[: spec.in_chans], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std[: spec.in_chans], dtype=np.float32).reshape(-1, 1, 1)
    return (np.broadcast_to(x, (spec.in_chans, *x.shape)) - mean) / std
