"""A small real bundle (MobileNet-V1 0.25 @128, ImageNet init) trained on real CXR in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

WEIGHTS_NAME = "mobilenetv1_025_tfslim_quant_in1k_128.safetensors"


def _link_part(samples, root: Path) -> Path:
    """``root/<label>/<file>`` symlinks to the samples (no copies of ../shared)."""
    for s in samples:
        (root / s.label).mkdir(parents=True, exist_ok=True)
        os.symlink(s.path, root / s.label / s.path.name)
    return root


@pytest.fixture(scope="session")
def cxr_parts(cxr_root, tmp_path_factory) -> dict[str, Path]:
    """Patient-disjoint train / val / test folders of symlinks into ../shared/data/cxr."""
    from fedbridge_shared.data.samples import scan_folder
    from fedbridge_shared.data.split import assign_parts

    index = scan_folder(cxr_root)
    parts = assign_parts(index.samples, {"train": 0.5, "val": 0.2, "test": 0.3}, seed=0)
    root = tmp_path_factory.mktemp("cxr-parts")
    return {name: _link_part(samples, root / name) for name, samples in parts.items()}


@pytest.fixture(scope="session")
def cxr_bundle(cxr_parts, weights_root, tmp_path_factory) -> Path:
    """A 4-class CXR bundle: ImageNet MobileNet-V1 0.25 fine-tuned 3 epochs at 128 px."""
    from rich.console import Console

    from fedbridge_shared.training import TrainConfig, run_stage

    weights = weights_root / WEIGHTS_NAME
    if not weights.is_file():
        pytest.skip(f"{weights} not found")
    out = tmp_path_factory.mktemp("bundle") / "cxr"
    config = TrainConfig(
        epochs=3, batch_size=32, lr=2e-3, val_fraction=0.0, online_augment=False, preset="none"
    )
    run_stage(
        "target",
        cxr_parts["train"],
        out=out,
        init=str(weights),
        config=config,
        arch="mobilenetv1_025",
        image_size=128,
        device="cpu",
        console=Console(stderr=True, quiet=True),
    )
    return out


@pytest.fixture(scope="session")
def photo_png(tmp_path_factory) -> Path:
    """A natural-photo-like RGB scene (sky, sun, hills, house) drawn with PIL."""
    from PIL import ImageDraw

    img = Image.new("RGB", (320, 240))
    draw = ImageDraw.Draw(img)
    for y in range(150):  # sky gradient
        draw.line([(0, y), (320, y)], fill=(90 + y // 3, 150 + y // 4, 255))
    draw.rectangle([0, 150, 320, 240], fill=(60, 140, 50))
    draw.ellipse([240, 20, 290, 70], fill=(255, 230, 90))
    draw.polygon([(0, 160), (90, 90), (180, 160)], fill=(90, 110, 80))
    draw.rectangle([120, 140, 200, 210], fill=(180, 60, 50))
    draw.polygon([(110, 140), (160, 100), (210, 140)], fill=(110, 40, 30))
    draw.rectangle([150, 170, 170, 210], fill=(70, 40, 20))
    path = tmp_path_factory.mktemp("ood") / "photo.jpg"
    img.save(path, quality=92)
    return path


@pytest.fixture(scope="session")
def noise_png(tmp_path_factory) -> Path:
    """Uniform random noise, 256×256 greyscale."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("noise") / "noise.png"
    Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def edge_onnx(cxr_bundle, cxr_parts, tmp_path_factory) -> Path:
    """The bundle exported with the real CLI (fp32, dynamic batch, OOD calibrated on val)."""
    from cli import ok

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = ok("export", "onnx", cxr_bundle, "--out", out, "--val", cxr_parts["val"])
    assert "parity onnxruntime vs PyTorch" in result.stdout
    return out
