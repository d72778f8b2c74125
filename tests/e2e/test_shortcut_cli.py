"""Shortcut audit, external evaluation under a declared label mapping and the several-folder
bridge, end to end with the real CLI on real chest X-rays (the session bundle of conftest)."""

import csv
import json
import os
from collections import Counter
from pathlib import Path

from cli import assert_one_line_error, fedbridge, ok

from fedbridge_shared.models import retarget
from fedbridge_shared.spec import load_bundle

MAP = "PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA"
TARGET = ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")


def _manifest_counts(folder: Path) -> tuple[Counter, Counter]:
    """Images per label and per (source, label), read from MANIFEST.csv independently."""
    with (folder / "MANIFEST.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return Counter(r["label"] for r in rows), Counter(r["source_dataset"] for r in rows)


def test_evaluate_scores_cxr_external_under_a_declared_mapping(
    cxr_bundle, edge_onnx, data_root, tmp_path
):
    external = data_root / "cxr-external"
    labels, sources = _manifest_counts(external)
    out = tmp_path / "report"
    run = ok("evaluate", cxr_bundle, external, "--label-map", MAP, "--onnx", edge_onnx,
             "--out", out, "--bootstrap", "50")  # fmt: skip
    assert "holds other weights" not in run.stderr  # the ONNX is this bundle's export
    metrics = json.loads((out / "metrics.json").read_text())
    ext = metrics["external"]
    assert ext["n"] == sum(labels.values()) == 165
    per_label = ext["per_label"]
    assert {k: v["n"] for k, v in per_label.items()} == dict(labels)
    assert ext["accuracy"]["k"] == sum(v["k"] for v in per_label.values())
    pneu = per_label["PNEUMONIA_UNSPECIFIED"]
    called = pneu["called"]
    assert pneu["k"] == called.get("BACTERIAL_PNEUMONIA", 0) + called.get("VIRAL_PNEUMONIA", 0)
    sens = ext["COVID19_sensitivity"]
    assert (sens["n"], sens["k"]) == (58, per_label["COVID19"]["called"].get("COVID19", 0))
    false_covid = ext["non_COVID19_called_COVID19"]
    assert false_covid["n"] == labels["NORMAL"] + labels["PNEUMONIA_UNSPECIFIED"]
    assert false_covid["k"] == sum(
        per_label[x]["called"].get("COVID19", 0) for x in ("NORMAL", "PNEUMONIA_UNSPECIFIED")
    )
    ood = ext["ood"]
    assert ood["measured"] is True and ood["n"] == 165 and 0 <= ood["refused"] <= 165
    # the paper's metrics cover the images with one model label: COVID19 and NORMAL
    assert metrics["n"] == labels["COVID19"] + labels["NORMAL"]
    audit = metrics["shortcut"]
    assert {k: v["n"] for k, v in audit["per_source"].items()} == dict(sources)
    assert audit["probe"]["source"]["available"] and audit["probe"]["label"]["available"]
    html = (out / "report.html").read_text()
    assert '<section id="shortcut">' in html and "External labels" in html
    assert ood["text"] in html


def test_evaluate_refuses_an_unmapped_external_label(cxr_bundle, data_root, tmp_path):
    out = tmp_path / "report"
    result = fedbridge("evaluate", cxr_bundle, data_root / "cxr-external", "--out", out)
    assert_one_line_error(result, "PNEUMONIA_UNSPECIFIED", "--label-map")
    assert not out.exists()
    bad = fedbridge("evaluate", cxr_bundle, data_root / "cxr-external", "--label-map", "X=Y")
    assert_one_line_error(bad, "--label-map", "Y is not a label of the model")


def test_every_assessment_carries_the_shortcut_audit(cxr_bundle, cxr_parts, data_root, tmp_path):
    """Test patients of ../shared/data/cxr: both sources audited; the probe runs on both."""
    out = tmp_path / "report"
    ok(
        "evaluate",
        cxr_bundle,
        cxr_parts["test"],
        "--out",
        out,
        "--bootstrap",
        "50",
        "--manifest",
        data_root / "MANIFEST.csv",
    )  # the parts are symlinks to files it lists
    metrics = json.loads((out / "metrics.json").read_text())
    audit = metrics["shortcut"]
    per = audit["per_source"]
    assert set(per) == {"ieee8023-covid-chestxray-dataset", "Kermany2018-ChestXRay"}
    assert sum(s["n"] for s in per.values()) == metrics["n"]
    ieee = per["ieee8023-covid-chestxray-dataset"]
    cm = ieee["confusion_matrix"]
    assert cm["columns"] == list(metrics["labels"])
    assert sum(map(sum, cm["counts"])) == ieee["n"]
    non_covid = sum(
        sum(row) for r, row in zip(cm["rows"], cm["counts"], strict=True) if r != "COVID19"
    )
    called = ieee["non_COVID19_called_COVID19"]
    assert called["n"] == non_covid
    assert called["k"] == sum(
        row[cm["columns"].index("COVID19")]
        for r, row in zip(cm["rows"], cm["counts"], strict=True)
        if r != "COVID19"
    )
    probe = audit["probe"]
    assert 0 <= probe["source"]["balanced_accuracy"] <= 1
    assert audit["flagged"] == (probe["source"]["adjusted"] > probe["label"]["adjusted"])
    html = (out / "report.html").read_text()
    assert ("reads the image's source more easily than its disease" in html) == audit["flagged"]


def _tiny(src: Path, root: Path, per_class: int) -> Path:
    for label_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        (root / label_dir.name).mkdir(parents=True)
        for f in sorted(label_dir.iterdir())[:per_class]:
            os.symlink(f, root / label_dir.name / f.name)
    return root


def test_bridge_on_two_folders_unites_labels_and_records_each(weights_root, data_root, tmp_path):
    kermany = _tiny(data_root / "bridge" / "cxr", tmp_path / "kermany", 6)
    adult = _tiny(data_root / "bridge" / "cxr-adult", tmp_path / "adult", 6)
    out = tmp_path / "bridge"
    weights = weights_root / "mobilenetv1_025_tfslim_quant_in1k_128.safetensors"
    ok("bridge", kermany, adult, "--out", out, "--init", weights, "--model", "mobilenetv1_025",
       "--image-size", "64", "--epochs", "1", "--val-fraction", "0", "--device", "cpu")  # fmt: skip
    bundle = load_bundle(out)
    assert bundle.spec.labels == (
        "BACTERIAL_PNEUMONIA", "NORMAL", "PNEUMONIA_UNSPECIFIED", "VIRAL_PNEUMONIA",
    )  # fmt: skip
    folders = bundle.training["folders"]
    assert [Path(f["path"]) for f in folders] == [kermany.resolve(), adult.resolve()]
    assert folders[0]["counts"] == {"BACTERIAL_PNEUMONIA": 6, "NORMAL": 6, "VIRAL_PNEUMONIA": 6}
    assert folders[1]["counts"] == {"NORMAL": 6, "PNEUMONIA_UNSPECIFIED": 6}
    assert bundle.training["counts"]["train"]["NORMAL"] == 12
    # carry-over to the 4-class target by name: PNEUMONIA_UNSPECIFIED stays a bridge-only class
    model, spec = retarget(bundle, TARGET)
    assert spec.init["label_map"] == {
        "BACTERIAL_PNEUMONIA": "BACTERIAL_PNEUMONIA", "COVID19": None,
        "NORMAL": "NORMAL", "VIRAL_PNEUMONIA": "VIRAL_PNEUMONIA",
    }  # fmt: skip
    head = model.get_classifier().weight.detach()
    source = bundle.state_dict["classifier.weight"]
    assert (head[2] == source[1]).all() and (head[1] == 0).all()
    twice = fedbridge("bridge", kermany, kermany, "--out", tmp_path / "b2", "--init", weights,
                      "--model", "mobilenetv1_025", "--device", "cpu")  # fmt: skip
    assert_one_line_error(twice, "given twice")
    assert not (tmp_path / "b2").exists()


def _pneumonia_called_pneumonia(bundle: Path, folder: Path, out: Path) -> int:
    """How many PNEUMONIA_UNSPECIFIED films the bundle calls BACTERIAL or VIRAL."""
    ok("evaluate", bundle, folder, "--label-map", MAP, "--out", out, "--bootstrap", "0")
    ext = json.loads((out / "metrics.json").read_text())["external"]
    return ext["per_label"]["PNEUMONIA_UNSPECIFIED"]["k"]


def test_train_on_films_whose_class_is_a_set_of_the_models_labels(
    cxr_bundle, cxr_parts, data_root, tmp_path
):
    adult = _tiny(data_root / "bridge" / "cxr-adult", tmp_path / "adult", 24)
    before = _pneumonia_called_pneumonia(cxr_bundle, adult, tmp_path / "before")
    out = tmp_path / "target"
    ok("train", cxr_parts["train"], adult, "--out", out, "--init", cxr_bundle, "--label-map", MAP,
       "--epochs", "3", "--augment-per-sample", "0", "--device", "cpu")  # fmt: skip
    bundle = load_bundle(out)
    assert bundle.spec.labels == TARGET  # the set-labelled folder is no class of the model
    assert bundle.training["label_map"] == {
        "PNEUMONIA_UNSPECIFIED": list(MAP.split("=")[1].split("|"))
    }
    counts = bundle.training["counts"]
    assert counts["train"]["PNEUMONIA_UNSPECIFIED"] == 24  # trained on, never validated on
    assert "PNEUMONIA_UNSPECIFIED" not in counts["val"] and counts["val"]
    after = _pneumonia_called_pneumonia(out, adult, tmp_path / "after")
    assert after >= before + 6, (before, after)  # a clear move onto the set (seen: 2 → 11)
    bad = fedbridge("train", cxr_parts["train"], "--out", tmp_path / "t2", "--init", cxr_bundle,
                    "--label-map", "ADULT=NORMAL", "--device", "cpu")  # fmt: skip
    assert_one_line_error(bad, "--label-map ADULT")
    assert not (tmp_path / "t2").exists()
