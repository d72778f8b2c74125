"""Resize and normalise: the one preprocessing that training and the bedside share.

numpy + OpenCV only (no torch), so ``fedbridge_edge`` reproduces training inputs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: square size, channels and per-channel mean/std."""

    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> InputSpec:
        """From the ``spec`` object of a bundle's model.json."""
        in_chans = int(spec.get("in_chans", 3))
        return cls(
            image_size=int(spec["image_size"]),
            in_chans=in_chans,
            mean=tuple(float(x) for x in spec.get("mean", (0.5,) * 3))[:in_chans],
            std=tuple(float(x) for x in spec.get("std", (0.5,) * 3))[:in_chans],
        )


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Greyscale uint8 to ``size`` × ``size`` (area when shrinking, bilinear when enlarging)."""
    interp = cv2.INTER_AREA if min(img.shape) >= size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def normalise(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resized greyscale uint8 (H, W) → float32 (C, H, W), channel repeated, mean/std applied."""
    x = img.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean[: spec.in_chans], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std[: spec.in_chans], dtype=np.float32).reshape(-1, 1, 1)
    return (np.broadcast_to(x, (spec.in_chans, *x.shape)) - mean) / std
