"""Fixtures shared by the federated end-to-end tests."""

import pytest
from cli import ok


@pytest.fixture(scope="session")
def fed(cxr_root, tmp_path_factory):
    """A 3-site patient split of real CXR and a tiny bridge bundle (48 px, 1 epoch)."""
    root = tmp_path_factory.mktemp("fed")
    split = root / "split"
    ok(
        "data",
        "split",
        cxr_root,
        "--out",
        split,
        "--sites",
        "3",
        "--bridge-fraction",
        "0.3",
        "--test-fraction",
        "0.2",
        "--seed",
        "2",
    )
    ok(
        "bridge",
        split / "bridge",
        "--out",
        root / "bridge",
        "--model",
        "test_efficientnet",
        "--init",
        "none",
        "--image-size",
        "48",
        "--epochs",
        "1",
        "--batch-size",
        "32",
    )
    return root, split


@pytest.fixture
def net():
    """Coordinator and sites in network namespaces of their own (loopback where impossible)."""
    from netns import Topology

    names = ["coord", "site-a", "site-b", "intruder", "site-1", "site-2", "site-3"]
    topology = Topology(names).up()
    print(topology.describe())
    try:
        yield topology
    finally:
        topology.down()
