"""Fixtures: paths into the team folder ../shared (real images, weights) and bad inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so tests can `import badinputs`

from badinputs import make_bad_inputs  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights"


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
