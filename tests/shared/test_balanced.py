"""Class-balanced sampling: every class equally frequent over many draws, reproducibly."""

import numpy as np
import torch

from fedbridge_shared.data.tensors import make_loader
from fedbridge_shared.spec import ModelSpec

SPEC = ModelSpec(arch="test_efficientnet", labels=("A", "B", "C"), image_size=16)
TARGETS = [0] * 60 + [1] * 30 + [2] * 10  # 6 : 3 : 1
IMAGES = [np.full((16, 16), i, dtype=np.uint8) for i in range(len(TARGETS))]


def _loader(seed: int, *, balanced: bool, copies: int = 0):
    return make_loader(
        IMAGES, TARGETS, SPEC, batch_size=10, train=True, online=False, seed=seed,
        balanced=balanced, augment_per_sample=copies, preset="none",
    )  # fmt: skip


def _labels(loader, epochs: int) -> np.ndarray:
    return np.concatenate([y.numpy() for _ in range(epochs) for _, y in loader])


def test_classes_are_drawn_equally_often():
    y = _labels(_loader(1, balanced=True), epochs=30)  # 30 × 100 = 3000 draws
    n, k = len(y), 3
    sd = np.sqrt(n * (1 / k) * (1 - 1 / k))  # binomial sd of one class's count
    counts = np.bincount(y, minlength=k)
    assert np.all(np.abs(counts - n / k) < 4 * sd), counts
    plain = np.bincount(_labels(_loader(1, balanced=False), epochs=30), minlength=k)
    assert plain.tolist() == [1800, 900, 300]  # without it: the data's 6 : 3 : 1


def test_balanced_with_offline_copies_weighs_by_class_not_by_copy():
    y = _labels(_loader(2, balanced=True, copies=2), epochs=10)  # 10 × 300 draws
    n, k = len(y), 3
    sd = np.sqrt(n * (1 / k) * (1 - 1 / k))
    assert np.all(np.abs(np.bincount(y, minlength=k) - n / k) < 4 * sd)


def test_balanced_draws_are_seeded():
    def order(seed: int) -> list[torch.Tensor]:
        return [x[:, 0, 0, 0] for x, _ in _loader(seed, balanced=True)]

    a, b, c = order(3), order(3), order(4)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
