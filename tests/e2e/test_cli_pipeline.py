"""split → bridge → train → evaluate through the real CLI on real chest X-rays (tiny model)."""

import csv
import json

import pytest
from cli import assert_one_line_error, fedbridge, json_out, ok

TINY = ["--model", "test_efficientnet", "--init", "none", "--image-size", "64"]


@pytest.fixture(scope="module")
def pipeline(cxr_root, tmp_path_factory):
    """Run the three stages once; tests below inspect the results."""
    root = tmp_path_factory.mktemp("pipeline")
    split = root / "split"
    ok(
        "data",
        "split",
        cxr_root,
        "--out",
        split,
        "--sites",
        "2",
        "--bridge-fraction",
        "0.5",
        "--test-fraction",
        "0.2",
        "--seed",
        "1",
    )
    ok(
        "bridge",
        split / "bridge",
        "--out",
        root / "bridge",
        *TINY,
        "--epochs",
        "2",
        "--batch-size",
        "32",
    )
    ok(
        "train",
        split / "site-1",
        "--out",
        root / "target",
        "--init",
        root / "bridge",
        "--augment-per-sample",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "32",
    )
    metrics = json_out(
        "evaluate",
        root / "target",
        split / "test",
        "--json",
        "--out",
        root / "report",
        "--bootstrap",
        "200",
    )
    return root, split, metrics


def test_split_is_patient_disjoint_and_covers_every_image(pipeline, cxr_root):
    _, split, _ = pipeline
    rows = list(csv.DictReader((split / "split.csv").open()))
    assert len(rows) == 581
    parts_of = {}
    for r in rows:
        parts_of.setdefault(r["patient_id"], set()).add(r["part"])
        assert (split / r["path"]).is_file()
    assert all(len(p) == 1 for p in parts_of.values())
    assert {r["part"] for r in rows} == {"bridge", "site-1", "site-2", "test"}


def test_bundles_record_their_stage_and_lineage(pipeline):
    root, _, _ = pipeline
    bridge = json.loads((root / "bridge" / "model.json").read_text())
    target = json.loads((root / "target" / "model.json").read_text())
    assert bridge["training"]["stage"] == "bridge" and bridge["spec"]["init"]["kind"] == "none"
    assert target["spec"]["init"]["kind"] == "bundle"
    assert target["spec"]["init"]["sha256"] == bridge["weights_sha256"]
    assert target["training"]["config"]["augment_per_sample"] == 2
    assert target["training"]["patient_ids"].startswith("manifest")  # ids from split.csv
    assert len(target["training"]["history"]) == 2


def test_evaluate_json_has_the_paper_metrics(pipeline):
    root, split, m = pipeline
    for key in (
        "accuracy",
        "macro_auc",
        "sensitivity_mean",
        "sensitivity_sd",
        "f1_mean",
        "f1_sd",
        "confusion_matrix",
        "labels",
        "n",
        "ci95",
    ):
        assert key in m, key
    n_test = sum(1 for p in (split / "test").rglob("*.jpg"))
    assert m["n"] == n_test == sum(map(sum, m["confusion_matrix"]))
    diag = sum(m["confusion_matrix"][i][i] for i in range(4))
    assert m["accuracy"] == pytest.approx(diag / n_test)
    lo, hi = m["ci95"]["accuracy"]
    assert lo <= m["accuracy"] <= hi
    for name in ("metrics.json", "confusion_matrix.png", "roc.png"):
        assert (root / "report" / name).stat().st_size > 1000


def test_evaluate_refuses_a_dataset_with_other_classes(pipeline, oct_root):
    root, _, _ = pipeline
    result = fedbridge("evaluate", root / "target", oct_root, "--json")
    assert_one_line_error(result, str(oct_root), "not among the model's labels")
    assert result.stdout == ""
