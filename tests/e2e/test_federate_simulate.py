"""Federated target stage through Flower's simulation runtime on real chest X-rays.

The split and tiny bridge bundle come from the session fixture ``fed`` (tests/e2e/conftest.py).
"""

import json
import shutil
import sys

import cloudpickle
import pytest
import torch
from cli import assert_one_line_error, fedbridge, ok
from rich.console import Console

from fedbridge.simulate import simulate
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.html_report import bundle_context
from fedbridge_shared.spec import load_bundle

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # mods below run in Ray actors


def _flat(root, out, **extra):
    base = {
        "init": str(root / "bridge"),
        "out": str(out),
        "num-server-rounds": 2,
        "augment-per-sample": 1,
        "batch-size": 32,
        "min-train-sites": 3,
        "min-evaluate-sites": 3,
        "min-available-sites": 3,
        "lr": 1e-3,
        "seed": 5,
    }
    return {**base, **extra}


def _sites(split):
    return [split / f"site-{i}" for i in (1, 2, 3)]


def _run(flat, sites, **kw):
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    return simulate(flat, sites, out=quiet, **kw)


def crash_site_2_in_round_2(msg, context, call_next):
    """A ClientApp mod: site-2 (partition 1) crashes while training in round 2."""
    if (
        int(context.node_config["partition-id"]) == 1
        and msg.metadata.message_type == "train"
        and int(msg.content["config"]["server-round"]) == 2
    ):
        raise RuntimeError("simulated crash of site-2")
    return call_next(msg, context)


def test_simulation_writes_rounds_and_best_bundle_and_audits_every_message(fed, tmp_path):
    root, split = fed
    audit = tmp_path / "audit"
    summary = _run(
        _flat(root, tmp_path / "fed", **{"test-data": str(split / "test")}),
        _sites(split),
        audit_dir=audit,
    )
    # rounds, best-model selection and the final bundle
    assert [h["round"] for h in summary["history"]] == [1, 2]
    assert all(h["sites"] == ["site-1", "site-2", "site-3"] for h in summary["history"])
    best = min(summary["history"], key=lambda h: h["score"])["round"]
    assert summary["best_round"] == best
    bundle = load_bundle(tmp_path / "fed")
    assert bundle.training["stage"] == "federated" and bundle.training["best_round"] == best
    state = json.loads((tmp_path / "fed-rounds" / "state.json").read_text())
    assert state["completed"] == 2
    # per site and round: its images per class (train + val = its folders) and its metrics
    for row in summary["history"]:
        assert list(row["per_site"]) == ["site-1", "site-2", "site-3"]
        for name, site in row["per_site"].items():
            on_disk = {
                d.name: sum(1 for _ in d.glob("*.jpg")) for d in sorted((split / name).iterdir())
            }
            both = {k: site["train_counts"][k] + site["val_counts"][k] for k in on_disk}
            assert both == on_disk and site["val_examples"] == sum(site["val_counts"].values())
            assert 0.0 <= site["val_accuracy"] <= 1.0 and site["train_loss"] > 0
    assert state["history"][-1]["per_site"] == summary["history"][-1]["per_site"]
    assert summary["test"]["n"] == sum(1 for _ in (split / "test").rglob("*.jpg"))
    report = tmp_path / "fed-report"  # --test-data writes the assessment's report beside OUT
    assert summary["report"] == str(report)
    assert json.loads((report / "metrics.json").read_text())["n"] == summary["test"]["n"]
    assert '<section id="roc">' in (report / "report.html").read_text()
    # privacy: every message each site sent holds model tensors, numbers and its name only
    n_weights = sum(v.numel() for v in bundle.state_dict.values() if v.is_floating_point())
    entries = [
        json.loads(line)
        for f in sorted(audit.glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    assert len(entries) == 3 * 2 * 2  # 3 sites × 2 rounds × (train + evaluate)
    data_words = [str(split), "site-1/", ".jpg", "kermany", "ieee8023", "/"]
    for e in entries:
        for key, rec in e["records"].items():
            if rec["kind"] == "arrays":
                # the model's weights packed into one vector, nothing else
                assert {k: v["shape"] for k, v in rec["items"].items()} == {"weights": [n_weights]}
                assert all(v["dtype"] == "float32" for v in rec["items"].values())
            elif rec["kind"] == "metrics":
                assert all(isinstance(v, int | float) for v in rec["items"].values())
            else:
                assert key == "site" and set(rec["items"]) == {"name"}
                assert rec["items"]["name"] in {"site-1", "site-2", "site-3"}
        text = json.dumps(e["records"])
        assert not any(w in text for w in data_words), text


def test_restart_resumes_and_ends_with_the_same_weights(fed, tmp_path):
    root, split = fed
    whole = _run(_flat(root, tmp_path / "whole"), _sites(split))
    _run(_flat(root, tmp_path / "parts"), _sites(split))
    # a crash during round 2's checkpoint: its weights never made it, nor did the final bundle
    (tmp_path / "parts-rounds" / "round-0002" / "model.safetensors").unlink()
    shutil.rmtree(tmp_path / "parts")
    resumed = _run(_flat(root, tmp_path / "parts"), _sites(split))
    assert [h["round"] for h in resumed["history"]] == [1, 2]
    for name in ("round-0002",):
        a = load_bundle(tmp_path / "whole-rounds" / name).state_dict
        b = load_bundle(tmp_path / "parts-rounds" / name).state_dict
        assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged"
    a, b = load_bundle(tmp_path / "whole").state_dict, load_bundle(tmp_path / "parts").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole["best_round"] == resumed["best_round"]


def test_a_site_crashing_mid_run_does_not_stop_the_round(fed, tmp_path):
    root, split = fed
    summary = _run(
        _flat(root, tmp_path / "fed", **{"min-train-sites": 2}),
        _sites(split),
        mods=[crash_site_2_in_round_2],
    )
    r1, r2 = summary["history"]
    assert r1["sites"] == ["site-1", "site-2", "site-3"] and r1["dropped"] == []
    assert r2["sites"] == ["site-1", "site-3"]
    # the crash (in a mod, outside fedbridge's handler) reaches the coordinator as an error
    # outside the schema: it is dropped without its text
    assert any("site-2: failed (site error (not in fedbridge's schema" in d for d in r2["dropped"])
    assert not any("simulated crash" in d for d in r2["dropped"])


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_run(fed, tmp_path, strategy):
    root, split = fed
    summary = _run(
        _flat(root, tmp_path / "fed", strategy=strategy, **{"num-server-rounds": 1}),
        _sites(split),
    )
    weights = load_bundle(tmp_path / "fed").state_dict
    assert summary["history"][0]["sites"] == ["site-1", "site-2", "site-3"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_server_momentum_with_site_ema_balanced_sampling_and_clahe_runs(fed, tmp_path):
    """FedAvgM over 2 rounds, sites keeping an EMA, sampling class-balanced and normalising
    intensity with CLAHE where the bridge did not (issue #16)."""
    root, split = fed
    recipe = {"strategy": "fedavgm", "fedavgm.momentum": 0.9, "ema-decay": 0.9, "balanced": True,
              "intensity": "clahe"}  # fmt: skip
    summary = _run(_flat(root, tmp_path / "fed", **recipe), _sites(split))
    assert [r["sites"] for r in summary["history"]] == [["site-1", "site-2", "site-3"]] * 2
    bundle = load_bundle(tmp_path / "fed")
    assert load_bundle(root / "bridge").spec.intensity == "none"
    assert bundle.spec.intensity == "clahe"  # the run config's, which every site trained with
    assert all(torch.isfinite(v).all() for v in bundle.state_dict.values() if v.is_floating_point())
    assert (tmp_path / "fed-rounds").is_dir()


def test_dp_noises_trainable_weights_only_and_reports_the_privacy_spent(fed, tmp_path):
    root, split = fed
    out = tmp_path / "fed"
    flat = _flat(root, out, **{"dp.enabled": True, "dp.target-epsilon": 8.0})
    summary = _run(flat, _sites(split))
    rows = summary["history"]
    eps = [r["privacy"]["epsilon"] for r in rows]
    assert 0 < eps[0] < eps[1] <= 8.0 * 1.01  # spent grows per round, the target holds
    assert all(r["privacy"]["sites"] == 3 and r["privacy"]["noise_std"] > 0 for r in rows)
    bundle, init = load_bundle(out), load_bundle(root / "bridge")
    privacy = bundle.training["privacy"]
    assert privacy["epsilon"] == eps[-1] and privacy["rounds"] == 2
    assert privacy["delta"] == 1e-5 and "opacus RDP" in privacy["accountant"]
    # the report (evaluate, federate --test) states it in its settings table
    shown = bundle_context(bundle)[0]["differential privacy"]
    assert f"ε = {eps[-1]:.2f}, δ = 1e-05) over 2 round(s)" in shown and "opacus RDP" in shown
    weights = bundle.state_dict
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    stats = [k for k in weights if k.endswith(("running_mean", "running_var"))]
    assert stats, "the tiny model has BatchNorm layers"
    # BatchNorm statistics are never noised: they stay the bridge model's (variances > 0)
    assert all(torch.equal(weights[k], init.state_dict[k]) for k in stats)
    conv = next(k for k in weights if k.endswith("weight") and weights[k].dim() == 4)
    assert not torch.equal(weights[conv], init.state_dict[conv])  # the weights did train
    # model.json is strict JSON: no bare NaN/Infinity anywhere
    json.loads((out / "model.json").read_text(), parse_constant=lambda c: 1 / 0)


def test_dp_with_fedadam_is_refused_before_starting(fed, tmp_path):
    root, split = fed
    flat = _flat(root, tmp_path / "fed", strategy="fedadam", **{"dp.enabled": True})
    with pytest.raises(ConfigError, match="'dp.enabled'.*fedavg or fedprox"):
        _run(flat, _sites(split))
    assert not (tmp_path / "fed-rounds").exists()


def test_cli_refuses_a_site_with_other_labels_before_starting(fed, oct_root, tmp_path):
    root, split = fed
    result = fedbridge(
        "federate",
        "simulate",
        "--init",
        root / "bridge",
        "--site",
        split / "site-1",
        "--site",
        oct_root,
        "--out",
        tmp_path / "x",
    )
    assert_one_line_error(result, str(oct_root), "are not among the model's labels")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x-rounds").exists()


def test_sites_without_validation_patients_do_not_stop_the_run(fed, tmp_path):
    """No site holds validation patients: federated evaluation is skipped, not divided by 0."""
    root, split = fed
    summary = _run(
        _flat(root, tmp_path / "fed", **{"num-server-rounds": 1, "val-fraction": 0.0}),
        _sites(split),
    )
    (row,) = summary["history"]
    assert row["sites"] == ["site-1", "site-2", "site-3"]
    assert row["federated_val_loss"] is None and row["score"] is None
    assert summary["best_round"] == 1 and load_bundle(tmp_path / "fed").training["rounds"] == 1


def test_a_resumed_run_must_keep_its_number_of_rounds(fed, tmp_path):
    # The sites' learning-rate schedule spans all rounds, so more rounds change every round.
    root, split = fed
    _run(_flat(root, tmp_path / "fed", **{"num-server-rounds": 1}), _sites(split))
    with pytest.raises(ConfigError, match="num-server-rounds"):
        _run(_flat(root, tmp_path / "fed"), _sites(split))


def test_a_three_label_bridge_becomes_a_four_label_federated_model(fed, tmp_path):
    """Kermany-like bridge without COVID19 → 4-label sites: rows carried by name (CLI path)."""
    root, split = fed
    bridge_data = tmp_path / "bridge-3"
    bridge_data.mkdir()
    for label_dir in (split / "bridge").iterdir():
        if label_dir.name != "COVID19":
            (bridge_data / label_dir.name).symlink_to(label_dir.resolve())
    ok(
        "bridge", bridge_data, "--out", tmp_path / "bridge3", "--model", "test_efficientnet",
        "--init", "none", "--image-size", "48", "--epochs", "1", "--batch-size", "32",
    )  # fmt: skip
    bridge = load_bundle(tmp_path / "bridge3")
    assert "COVID19" not in bridge.spec.labels
    result = ok(
        "federate", "simulate", "--init", tmp_path / "bridge3",
        "--site", split / "site-1", "--site", split / "site-2",
        "--rounds", "1", "--augment-per-sample", "1", "--out", tmp_path / "fed4",
    )  # fmt: skip
    assert "new for COVID19" in result.stdout + result.stderr
    final = load_bundle(tmp_path / "fed4")
    assert final.spec.labels == ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")
    init = final.spec.init
    assert init["head"] == "mapped" and init["sha256"] == bridge.sha256
    assert init["label_map"]["COVID19"] is None
    assert init["label_map"]["NORMAL"] == "NORMAL"
    assert init["source_labels"] == list(bridge.spec.labels)


def test_a_site_with_adult_films_known_only_as_pneumonia_takes_part(fed, data_root, tmp_path):
    """`--label-map` at the sites that hold such a folder: its films train as a label set, only
    counts of the model's labels reach the coordinator, a name no site has is refused."""
    root, split = fed
    site = tmp_path / "site-adult"
    site.mkdir()
    for label_dir in (split / "site-1").iterdir():
        if label_dir.is_dir():
            (site / label_dir.name).symlink_to(label_dir.resolve())
    nih = data_root / "bridge" / "cxr-adult" / "PNEUMONIA_UNSPECIFIED"
    (site / nih.name).mkdir()
    for image in sorted(nih.glob("*.jpg"))[:12]:
        (site / nih.name / image.name).symlink_to(image)
    sites = ("--site", site, "--site", split / "site-2")
    typo = fedbridge("federate", "simulate", "--init", root / "bridge", *sites,
                     "--label-map", "ADULT=NORMAL", "--out", tmp_path / "x")  # fmt: skip
    assert_one_line_error(typo, "--label-map ADULT", "no --site has a class folder")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x-rounds").exists()
    audit = tmp_path / "audit"
    ok("federate", "simulate", "--init", root / "bridge", *sites, "--rounds", "1",
       "--augment-per-sample", "0", "--out", tmp_path / "fed", "--audit-dir", audit,
       "--label-map", "PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA")  # fmt: skip
    final = load_bundle(tmp_path / "fed")
    assert final.spec.labels == ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")
    state = json.loads((tmp_path / "fed-rounds" / "state.json").read_text())
    (row,) = state["history"]
    adult = row["per_site"]["site-1"]
    on_disk = {d.name: sum(1 for _ in d.glob("*.jpg")) for d in (split / "site-1").iterdir()}
    assert set(adult["train_counts"]) == set(final.spec.labels)
    both = {k: adult["train_counts"][k] + adult["val_counts"][k] for k in on_disk}
    assert both == on_disk  # the 12 set-labelled films are in no class's count
    sent = "".join(f.read_text() for f in audit.glob("*.jsonl"))
    assert "PNEUMONIA_UNSPECIFIED" not in sent and "train" in sent
