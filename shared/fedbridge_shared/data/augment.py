"""Albumentations presets: the paper's offline ×N expansion and lighter online augmentation.

Presets work on single-channel uint8 images already resized to the model's input size.
Chest X-rays are never flipped left-right by default: laterality (heart, lesions) matters.
"""

from __future__ import annotations

import os

# albumentations asks the internet for a newer version at import: hospitals have no internet
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402 (after the environment setting above)
import cv2

from fedbridge_shared import defaults
from fedbridge_shared.errors import ConfigError

PRESETS = defaults.AUGMENT_PRESETS


def _check(preset: str) -> None:
    if preset not in PRESETS:
        raise ConfigError(f"unknown augmentation preset {preset!r}; choose from {PRESETS}")


def offline_transform(preset: str) -> A.Compose | None:
    """Stronger augmentation that makes each of the N extra variants of a training image."""
    _check(preset)
    if preset == "none":
        return None
    geometric = A.Affine(
        rotate=(-10, 10) if preset == "cxr" else (-5, 5),
        scale=(0.9, 1.1),
        translate_percent=(-0.05, 0.05),
        border_mode=cv2.BORDER_CONSTANT,
        p=1.0,
    )
    steps: list[A.BasicTransform] = [geometric]
    if preset == "oct":
        steps.append(A.HorizontalFlip(p=0.5))  # B-scans of either eye are mirror images
    steps += [
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.8),
        A.CLAHE(clip_limit=2.0, p=0.3 if preset == "cxr" else 0.1),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.3),
    ]
    return A.Compose(steps)


def online_transform(preset: str) -> A.Compose | None:
    """Light augmentation redrawn every epoch for every training image."""
    _check(preset)
    if preset == "none":
        return None
    return A.Compose(
        [
            A.Affine(
                rotate=(-5, 5),
                scale=(0.95, 1.05),
                translate_percent=(-0.03, 0.03),
                border_mode=cv2.BORDER_CONSTANT,
                p=0.8,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    )
