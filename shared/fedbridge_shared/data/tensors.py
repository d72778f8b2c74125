"""Decoded-image cache and the torch Dataset every training stage uses."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from fedbridge_shared.data.augment import offline_transform, online_transform
from fedbridge_shared.data.images import read_image
from fedbridge_shared.data.pixels import InputSpec, normalise, resize
from fedbridge_shared.data.samples import Sample
from fedbridge_shared.spec import ModelSpec


def load_resized(path: Path, size: int) -> np.ndarray:
    """Read one image (greyscale uint8) and resize it to ``size`` × ``size``."""
    return resize(read_image(path), size)


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
    return torch.from_numpy(normalise(img, _input_spec(spec)))


def _input_spec(spec: ModelSpec) -> InputSpec:
    return InputSpec(
        spec.image_size, spec.in_chans, tuple(spec.mean), tuple(spec.std), spec.intensity
    )


def _seed(*parts: int) -> int:
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes())


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
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
        *,
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


def make_loader(
    images: Sequence[np.ndarray],
    targets: Sequence[int],
    spec: ModelSpec,
    *,
    batch_size: int,
    train: bool = False,
    preset: str = "none",
    augment_per_sample: int = 0,
    online: bool = True,
    seed: int = 0,
    shuffle_seed: int | None = None,
    balanced: bool = False,
) -> DataLoader[Any]:
    """The DataLoader every stage uses: samples → tensors → batches.

    ``train=True`` adds the ×N offline expansion and online augmentation (``online``), shuffles
    with a generator seeded by ``shuffle_seed`` (default ``seed``) and drops a last partial batch.
    ``balanced`` draws the epoch's items with replacement, weighted by inverse class frequency
    (every class equally likely), from the same seeded generator.
    Otherwise the images are served in order, unaugmented.
    """
    if not train:
        return DataLoader(ImageDataset(images, targets, spec), batch_size=batch_size)
    ds = ImageDataset(
        images,
        targets,
        spec,
        preset=preset,
        augment_per_sample=augment_per_sample,
        online=online,
        seed=seed,
    )
    generator = torch.Generator().manual_seed(seed if shuffle_seed is None else shuffle_seed)
    sampler = None
    if balanced:
        sampler = WeightedRandomSampler(
            # torch takes a tensor of weights; its stubs say Sequence[float]
            class_balanced_weights(ds),  # type: ignore[arg-type]
            len(ds),
            replacement=True,
            generator=generator,
        )
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        drop_last=len(ds) > batch_size,
    )


def class_balanced_weights(ds: ImageDataset) -> torch.Tensor:
    """Per-item weight 1 / (items of its class): every class gets the same total weight."""
    targets = np.repeat(np.asarray(ds.targets, dtype=np.int64), ds.copies)
    counts = np.bincount(targets)
    return torch.from_numpy(1.0 / counts[targets]).double()


def images_per_epoch(loader: DataLoader[Any]) -> int:
    """Images one pass over ``loader`` really yields: a dropped last partial batch excluded, so
    a progress bar's total is the count it reaches."""
    n = len(loader.dataset)  # type: ignore[arg-type]  # torch's Dataset type has no __len__
    if loader.drop_last and loader.batch_size:
        return (n // loader.batch_size) * loader.batch_size
    return n
