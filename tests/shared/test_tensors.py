"""The training Dataset: ×N offline expansion, seeded online augmentation, normalisation."""

import numpy as np
import pytest
import torch

from fedbridge_shared.data.augment import offline_transform
from fedbridge_shared.data.samples import scan_folder
from fedbridge_shared.data.tensors import ImageDataset, load_images, to_tensor
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.spec import ModelSpec

SPEC = ModelSpec(arch="test_efficientnet", labels=("A", "B"), image_size=64)


@pytest.fixture(scope="module")
def images(cxr_root):
    samples = scan_folder(cxr_root).by_label("NORMAL")[:3]
    return load_images(samples, 64)


OFFLINE4 = {"preset": "cxr", "augment_per_sample": 4, "online": False}


def test_expansion_multiplies_length_and_keeps_originals(images):
    ds = ImageDataset(images, [0, 1, 0], SPEC, preset="cxr", augment_per_sample=10)
    assert len(ds) == 33  # 3 images × (1 original + 10 variants)
    x0, y0 = ds[11]  # image 1, variant 0: the original
    assert y0 == 1 and torch.equal(x0, to_tensor(images[1], SPEC))
    variants = [ds[11 + v][0] for v in range(1, 11)]
    assert all(not torch.equal(v, x0) for v in variants)
    assert len({v.sum().item() for v in variants}) == 10  # ten distinct copies


def test_offline_variants_are_fixed_and_online_changes_per_epoch(images):
    a = ImageDataset(images, [0, 0, 0], SPEC, **OFFLINE4, seed=7)
    b = ImageDataset(images, [0, 0, 0], SPEC, **OFFLINE4, seed=7)
    c = ImageDataset(images, [0, 0, 0], SPEC, **OFFLINE4, seed=8)
    assert torch.equal(a[3][0], b[3][0]) and not torch.equal(a[3][0], c[3][0])
    on = ImageDataset(images, [0, 0, 0], SPEC, preset="cxr", online=True, seed=7)
    on.set_epoch(1)
    first = on[0][0]
    assert torch.equal(first, on[0][0])  # same epoch, same draw
    on.set_epoch(2)
    assert not torch.equal(first, on[0][0])


def test_cxr_preset_never_flips_but_oct_may():
    names = lambda t: {type(x).__name__ for x in t.transforms}  # noqa: E731
    assert "HorizontalFlip" not in names(offline_transform("cxr"))
    assert "HorizontalFlip" in names(offline_transform("oct"))
    with pytest.raises(ConfigError, match="unknown augmentation preset"):
        offline_transform("xray")


def test_to_tensor_repeats_grey_and_normalises():
    img = np.full((4, 4), 255, np.uint8)
    x = to_tensor(img, SPEC)
    assert x.shape == (3, 4, 4) and torch.allclose(x, torch.ones_like(x))  # (1-0.5)/0.5
    one = ModelSpec(arch="a", labels=("A", "B"), image_size=16, in_chans=1, mean=(0.0,), std=(1.0,))
    assert to_tensor(img, one).shape == (1, 4, 4)
