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
