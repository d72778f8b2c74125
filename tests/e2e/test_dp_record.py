"""Record-level DP-SGD through the real `fedbridge federate simulate`, and the release rule: a DP
model that validates below its start is never the result. Real CXR, real (tiny) models."""

import json
import math
import os

import torch
from cli import json_out, ok

from fedbridge_shared.data.samples import scan_folder
from fedbridge_shared.data.split import assign_parts
from fedbridge_shared.dp_accounting import epsilon
from fedbridge_shared.html_report import bundle_context
from fedbridge_shared.spec import load_bundle


def test_record_level_dp_sgd_records_epsilon_per_site(fed, tmp_path):
    root, split = fed
    out = tmp_path / "fed"
    result = ok(
        "federate", "simulate", "--init", root / "bridge", "--site", split / "site-1",
        "--site", split / "site-2", "--out", out, "--rounds", "2",
        "--set", "augment-per-sample=0", "--set", "batch-size=16", "--set", "seed=5",
        "--set", "dp.enabled=true", "--set", "dp.level=record", "--set", "dp.target-epsilon=8",
        "--set", "dp.max-grad-norm=1.0",
    )  # fmt: skip
    said = " ".join((result.stdout + result.stderr).split())
    assert "DP-SGD at every site, one patient per record" in said
    bundle, bridge = load_bundle(out), load_bundle(root / "bridge")
    privacy = bundle.training["privacy"]
    assert privacy["level"] == "record" and privacy["rounds"] == 2
    assert set(privacy["epsilon_per_site"]) == {"site-1", "site-2"}
    history = bundle.training["history"]
    for name, eps in privacy["epsilon_per_site"].items():
        # the accountant's ε for this site's (σ, q, steps) is the value recorded
        patients, sigma = (
            privacy["patients_per_site"][name],
            privacy["noise_multiplier_per_site"][name],
        )
        batch = min(16, patients)
        steps = 2 * math.ceil(patients / batch)  # 2 rounds × 1 local epoch
        assert eps == epsilon(sigma, sample_rate=batch / patients, steps=steps, delta=1e-5)
        assert 7.5 < eps <= 8.0 * 1.01  # σ derived by the site for the target
        rows = [h["per_site"][name] for h in history]
        assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] == eps  # spent grows per round
        assert patients <= rows[0]["train_examples"]  # one record per patient, not per image
        assert history[1]["privacy"]["epsilon_per_site"][name] == eps
    # BatchNorm is frozen under DP-SGD: its statistics stay the bridge's (FedAvg's weighted mean
    # of equal tensors may differ in the last float bit)
    stats = [k for k in bundle.state_dict if k.endswith(("running_mean", "running_var"))]
    assert stats and all(
        torch.allclose(bundle.state_dict[k], bridge.state_dict[k], rtol=1e-6, atol=1e-7)
        for k in stats
    )
    # the report's settings table and `server status` state each site's ε
    shown = bundle_context(bundle)[0]["differential privacy"]
    assert "record-level DP-SGD" in shown
    assert all(f"{n} ε = {e:.2f}" in shown for n, e in privacy["epsilon_per_site"].items())
    doc = json_out("server", "status", "--out", out, "--json")
    assert doc["privacy"]["epsilon_per_site"] == privacy["epsilon_per_site"]
    text = " ".join(ok("server", "status", "--out", out).stdout.split())
    assert "privacy spent (DP-SGD per patient" in text
    assert all(f"{n} ε {e:.2f}" in text for n, e in privacy["epsilon_per_site"].items())


def _two_sites(train, root):
    """The train part's patients dealt to two sites (folders of symlinks)."""
    parts = assign_parts(scan_folder(train).samples, {"site-a": 0.5, "site-b": 0.5}, seed=1)
    for name, samples in parts.items():
        for s in samples:
            (root / name / s.label).mkdir(parents=True, exist_ok=True)
            os.symlink(s.path, root / name / s.label / s.path.name)
    return [root / name for name in parts]


def test_a_dp_model_below_its_start_is_not_released(cxr_bundle, cxr_parts, tmp_path):
    """Site-level DP with overwhelming noise (σ = 1000, clip 10) wrecks the MobileNet: the
    starting bundle stays the result, the DP bundle goes aside, one line says so."""
    sites = _two_sites(cxr_parts["train"], tmp_path / "sites")
    out = tmp_path / "fed"
    result = ok(
        "federate", "simulate", "--init", cxr_bundle, "--site", sites[0], "--site", sites[1],
        "--out", out, "--rounds", "1", "--val-data", cxr_parts["val"],
        "--set", "augment-per-sample=0", "--set", "batch-size=32", "--set", "augment=none",
        "--set", "dp.enabled=true", "--set", "dp.noise-multiplier=1000",
        "--set", "dp.clipping-norm=10",
    )  # fmt: skip
    said = " ".join((result.stdout + result.stderr).split())
    aside = tmp_path / "fed-dp-below-start"
    assert said.count("validates below its start") == 1
    squeezed = "".join(said.split())  # the console may fold a long path at any character
    assert "".join(f"kept the starting bundle as the result; DP bundle: {aside}".split()) in (
        squeezed
    ), said
    record = json.loads((out / "model.json").read_text())["training"]
    assert record["released"] == "start" and record["dp_bundle"] == str(aside)
    assert record["dp_val_accuracy"] < record["start_val_accuracy"] - 0.1  # clearly worse
    released, start, dp = load_bundle(out), load_bundle(cxr_bundle), load_bundle(aside)
    assert all(torch.equal(released.state_dict[k], start.state_dict[k]) for k in start.state_dict)
    assert dp.training["released"] is False
    conv = next(k for k, v in dp.state_dict.items() if v.dim() == 4)
    assert not torch.equal(dp.state_dict[conv], start.state_dict[conv])
