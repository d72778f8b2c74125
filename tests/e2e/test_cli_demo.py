"""`fedbridge demo` end to end on the generated SYNTHETIC phantom set (tiny model)."""

import json

import pytest
from cli import assert_one_line_error, fedbridge, ok

from fedbridge.demo import DEMO_MARKER, claim_demo_folder, demo_entries
from fedbridge_shared.errors import ConfigError


def test_demo_on_phantom_data_says_synthetic_everywhere(tmp_path):
    out = tmp_path / "demo"
    result = ok(
        "demo", "--quick", "--out", out, "--model", "test_efficientnet", "--init", "none",
        "--image-size", "64",
    )  # fmt: skip
    assert "SYNTHETIC" in result.stdout
    summary = json.loads((out / "demo.json").read_text())
    assert summary["synthetic"] is True
    assert [r["model"] for r in summary["test"]] == [
        "bridge only",
        "federated (3 sites)",
        "central pooled",
        "local only: site-1",
        "local only: site-2",
        "local only: site-3",
    ]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] > 0 for r in summary["test"])
    assert sum(bool(r.get("best_local")) for r in summary["test"]) == 1
    fed, central = summary["test"][1], summary["test"][2]
    assert summary["federated_minus_central"] == fed["accuracy"] - central["accuracy"]
    assert "federated − central pooled" in result.stdout
    # the federated arm really ran rounds over three sites
    history = json.loads((out / "federated-bundle" / "model.json").read_text())["training"]
    assert [h["sites"] for h in history["history"]] == [["site-1", "site-2", "site-3"]] * 4
    report = json.loads((out / "report-federated" / "metrics.json").read_text())
    assert report["synthetic"] is True and report["n"] == fed["n"]
    assert (out / "report-federated" / "confusion_matrix.png").is_file()
    html = (out / "report-federated" / "report.html").read_text()
    assert "Federated rounds" in html and "data:image/png;base64," in html
    assert "README.txt" in {p.name for p in (out / "phantom-data").iterdir()}
    # the marker names everything the demo wrote, so a rerun removes only that
    assert {p.name for p in out.iterdir()} <= set(demo_entries())


def test_demo_rerun_replaces_its_own_entries_and_keeps_a_persons_files(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / DEMO_MARKER).write_text("{}")  # an earlier demo's folder …
    (out / "split").mkdir()
    (out / "split" / "stale.txt").write_text("old split")
    (out / "demo.json").write_text("{}")
    (out / "NOTES.txt").write_text("the coordinator's notes")  # … with a person's file added
    with pytest.raises(ConfigError, match="add --force"):
        claim_demo_folder(out, force=False)
    claim_demo_folder(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == [DEMO_MARKER, "NOTES.txt"]
    assert (out / "NOTES.txt").read_text() == "the coordinator's notes"
    assert json.loads((out / DEMO_MARKER).read_text())["entries"] == demo_entries()


def test_demo_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    result = fedbridge("demo", "--quick", "--out", tmp_path, "--init", "none")
    assert_one_line_error(result, str(tmp_path), "not a demo folder")
    assert (tmp_path / "mine.txt").read_text() == "keep"


def _real_subset(root, out, per_class):
    """``out/<label>/`` symlinks to the first ``per_class`` images of each class of ``root``."""
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        (out / label_dir.name).mkdir(parents=True)
        for img in sorted(label_dir.iterdir())[:per_class]:
            (out / label_dir.name / img.name).symlink_to(img)
    return out


def test_demo_bridges_on_a_public_set_with_other_labels(tmp_path, cxr_root, data_root):
    """Real images: a 3-class Kermany bridge, a 4-class target; shared rows carried by name."""
    bridge_root = data_root / "bridge" / "cxr"
    assert bridge_root.is_dir(), f"{bridge_root} not found (the team folder's bridge sets)"
    data = _real_subset(cxr_root, tmp_path / "target", 24)
    bridge = _real_subset(bridge_root, tmp_path / "bridge", 12)
    out = tmp_path / "demo"
    ok(
        "demo", "--quick", "--data", data, "--bridge-data", bridge, "--out", out,
        "--model", "test_efficientnet", "--init", "none", "--image-size", "64",
    )  # fmt: skip
    summary = json.loads((out / "demo.json").read_text())
    assert summary["bridge_data"] == str(bridge.resolve()) and summary["bridge_images"] == 36
    bridge_spec = json.loads((out / "bridge-bundle" / "model.json").read_text())["spec"]
    assert bridge_spec["labels"] == ["BACTERIAL_PNEUMONIA", "NORMAL", "VIRAL_PNEUMONIA"]
    expected = {
        "BACTERIAL_PNEUMONIA": "BACTERIAL_PNEUMONIA", "COVID19": None,
        "NORMAL": "NORMAL", "VIRAL_PNEUMONIA": "VIRAL_PNEUMONIA",
    }  # fmt: skip
    for arm in ("central-bundle", "federated-bundle", "local-site-1-bundle"):
        spec = json.loads((out / arm / "model.json").read_text())["spec"]
        assert spec["labels"] == ["BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA"]
        assert spec["init"]["label_map"] == expected, arm
    # "bridge only" cannot be assessed on the target's labels, every target arm is
    assert [r["model"] for r in summary["test"]][:2] == ["federated (3 sites)", "central pooled"]
    assert [r["n"] for r in summary["test"]] == [summary["test"][0]["n"]] * 5
    assert {p.name for p in out.iterdir()} <= set(demo_entries())


def test_bridge_subset_takes_whole_patients_up_to_the_cap_per_class(tmp_path, data_root):
    """--quick's bridge subset: ≤ cap images per class unless one patient's images cross it,
    patients never split, the same draw for the same seed, a manifest with their ids."""
    import csv

    from fedbridge.demo import _subset
    from fedbridge_shared.data.samples import scan_folder

    index = scan_folder(data_root / "bridge" / "cxr")
    a = _subset(index, tmp_path / "a", 10, seed=0)
    b = _subset(index, tmp_path / "b", 10, seed=0)
    with (a / "MANIFEST.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    with (b / "MANIFEST.csv").open() as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == [r["path"] for r in rows]
    for label in index.labels:
        mine = [r for r in rows if r["label"] == label]
        assert 10 <= len(mine) <= 12, label  # at most 3 images per patient in this set
        for pid in {r["patient_id"] for r in mine}:  # every image of a chosen patient
            whole = [s for s in index.samples if s.patient_id == pid and s.label == label]
            assert sum(r["patient_id"] == pid for r in mine) == len(whole)
    assert all((a / r["path"]).is_file() for r in rows)
    everything = _subset(index, tmp_path / "all", None, seed=0)
    assert len(scan_folder(everything).samples) == len(index.samples)
