"""Fixtures: paths into the team folder ../shared (real images, weights) and bad inputs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so tests can `import badinputs`

from badinputs import make_bad_inputs  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights"
WEIGHTS_NAME = "mobilenetv1_025_tfslim_quant_in1k_128.safetensors"


def _require(path: Path, reason: str) -> Path:
    if not path.is_dir():
        pytest.fail(reason + "; the tests need the team folder ../shared beside the repository")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    """../shared/data: real CXR and OCT class folders plus MANIFEST.csv."""
    return _require(DATA, "../shared/data not found (team folder with real images)")


@pytest.fixture(scope="session")
def cxr_root(data_root: Path) -> Path:
    """../shared/data/cxr: 581 chest X-rays in 4 class folders."""
    return _require(data_root / "cxr", "../shared/data/cxr not found")


@pytest.fixture(scope="session")
def oct_root(data_root: Path) -> Path:
    """../shared/data/oct: 480 retinal OCT B-scans in 4 class folders."""
    return _require(data_root / "oct", "../shared/data/oct not found")


@pytest.fixture(scope="session")
def weights_root() -> Path:
    """../shared/weights: real ImageNet weights for offline use."""
    return _require(WEIGHTS, "../shared/weights not found (team folder with ImageNet weights)")


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    """Broken and unusual image files (see tests/badinputs.py), written into a fresh tmp dir."""
    return make_bad_inputs(tmp_path / "inputs")


# ------------------------------------------- a small real CXR bundle and its edge model


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
        pytest.fail(f"{weights} not found: the tests need the team folder's ImageNet weights")
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
def edge_onnx(cxr_bundle, cxr_parts, tmp_path_factory) -> Path:
    """The bundle exported with the real CLI (fp32, dynamic batch, OOD calibrated on val)."""
    from cli import ok

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = ok("export", "onnx", cxr_bundle, "--out", out, "--val-data", cxr_parts["val"])
    assert "parity onnxruntime vs PyTorch" in result.stdout
    return out


# ------------------------------------------- test tiers (markers by where a test lives)

TIERS = {
    "e2e": lambda path: "/tests/e2e/" in path,
    "netns": lambda path: path.endswith(("test_federate_deploy.py", "test_faults_deploy.py")),
    "browser": lambda path: path.endswith("test_browser.py"),
    "pacs": lambda path: path.endswith("test_listen_pacs.py"),
}
"""Markers set from a test's file, so every test lands in a tier without per-test decoration.
``make test-fast`` deselects ``e2e``, ``slow``, ``netns``, ``browser`` and ``pacs``."""


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        path = str(item.path)
        for marker, applies in TIERS.items():
            if applies(path):
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture
def started():
    """Processes started by a test; all of them (and their children) end with it."""
    import subprocess

    from fedbridge_shared.processes import alive, descendants, stop, stop_pids

    procs: list[subprocess.Popen] = []
    yield procs
    stop([p for p in procs if p.poll() is None], timeout=20)
    leftovers = [pid for pid in descendants(p.pid for p in procs) if alive(pid)]
    stop_pids(leftovers, timeout=5)
