"""Secure aggregation through the real simulate path: 3 CXR sites, the tiny bridge, 1 round."""

import json

import numpy as np
from cli import ok

from fedbridge_shared.spec import load_bundle


def _simulate(root, split, out, secure: bool):
    sites = [a for i in (1, 2, 3) for a in ("--site", split / f"site-{i}")]
    ok(
        "federate", "simulate", "--init", root / "bridge", *sites, "--out", out, "--rounds", "1",
        "--set", "augment-per-sample=0", "--set", "batch-size=32", "--set", "seed=5",
        "--set", "threads=1", "--set", f"secure-aggregation={str(secure).lower()}",
    )  # fmt: skip
    return load_bundle(out)


def test_secure_aggregate_equals_plain_fedavg_through_simulate(fed, tmp_path):
    root, split = fed
    plain = _simulate(root, split, tmp_path / "plain", secure=False)
    secure = _simulate(root, split, tmp_path / "secure", secure=True)
    row = json.loads((tmp_path / "secure" / "model.json").read_text())["training"]["history"][0]
    info = row["secure_aggregation"]
    assert info["sites"] == 3 and info["threshold"] == 2 and info["clipped_values"] == 0
    assert info["bytes_from_sites"] > 0 and set(info["seconds"]) == {
        "keys",
        "share",
        "train",
        "unmask",
    }
    assert row["sites"] == ["site-1", "site-2", "site-3"]
    worst = 0.0
    for k, v in plain.state_dict.items():
        if v.is_floating_point():
            worst = max(worst, float((v - secure.state_dict[k]).abs().max()))
    assert worst < 1e-4, worst  # quantisation step 16/2³² ≈ 4e-9, plus float summation order
    moved = max(
        float((plain.state_dict[k] - load_bundle(root / "bridge").state_dict[k]).abs().max())
        for k in plain.state_dict
        if plain.state_dict[k].is_floating_point()
    )
    assert moved > 1e-3  # the round did change the weights: the comparison is not vacuous
    assert np.isfinite(worst)
