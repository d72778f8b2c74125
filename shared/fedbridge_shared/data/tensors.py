"""Decoded-image cache and the torch Dataset every training stage uses."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from fedbridge_shared.data.augment import offline_transform, online_transform
from fedbridge_shared.data.images import read_image
from fedbridge_shared.data.samples import Sample
from fedbridge_shared.spec import ModelSpec


def load_resized(path, size: int) -> np.ndarray:
    """Read one image (greyscale uint8) and resize it to ``size`` × ``size``."""
    img = read_image(path)
    interp = cv2.INTER_AREA if min(img.shape) >= size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def load_images(
    samples: Sequence[Sample], size: int, on_image: Callable[[], None] | None = None
) -> list[np.ndarray]:
    """Decode every sample once; a bad file raises DataError naming it."""
    images = []
    for s in samples:
        images.append(load_resized(s.path, size))
        if on_image:
            on_image()
    return images


def to_tensor(img: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """Greyscale uint8 (H, W) → normalised float (C, H, W); the channel is repeated for C > 1."""
    x = torch.from_numpy(img).float().div_(255.0)
    x = x.unsqueeze(0).expand(spec.in_chans, -1, -1)
    mean = torch.tensor(spec.mean[: spec.in_chans]).view(-1, 1, 1)
    std = torch.tensor(spec.std[: spec.in_chans]).view(-1, 1, 1)
    return (x - mean) / std


def _seed(*parts: int) -> int:
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes())


class ImageDataset(Dataset):
    """Samples as tensors, with the paper's offline ×N expansion and online augmentation.

    Index ``i`` is variant ``i % (N + 1)`` of image ``i // (N + 1)``; variant 0 is the image
    itself and variants 1..N are fixed augmented copies (seeded by image and variant, so every
    epoch and every run sees the same copies). Online augmentation is redrawn per epoch
    (call :meth:`set_epoch`) and is seeded too, so a run is reproducible.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        targets: Sequence[int],
        spec: ModelSpec,
        preset: str = "none",
        augment_per_sample: int = 0,
        online: bool = False,
        seed: int = 0,
    ) -> None:
        if len(images) != len(targets):
            raise ValueError("images and targets differ in length")
        self.images, self.targets, self.spec = list(images), list(targets), spec
        self.copies = 1 + max(0, augment_per_sample)
        self.offline = offline_transform(preset) if augment_per_sample > 0 else None
        self.online = online_transform(preset) if online else None
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) * self.copies

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index, variant = divmod(i, self.copies)
        img = self.images[index]
        if variant and self.offline is not None:
            self.offline.set_random_seed(_seed(self.seed, index, variant))
            img = self.offline(image=img)["image"]
        if self.online is not None:
            self.online.set_random_seed(_seed(self.seed, index, variant, self.epoch, 1))
            img = self.online(image=img)["image"]
        return to_tensor(img, self.spec), self.targets[index]
