"""The assessment report of a federated model, end to end on real chest X-rays.

A 2-round simulation on the ``fed`` split (tests/e2e/conftest.py), then ``fedbridge evaluate
--out``: the report's site, cross-site, lineage and model-card sections must show the numbers
the run recorded and the test images' real sources (ieee8023 vs Kermany).
"""

import csv
import json
import re
from collections import Counter
from pathlib import Path

from cli import ok
from rich.console import Console

from fedbridge.simulate import simulate
from fedbridge_shared.html_report import SECTIONS
from fedbridge_shared.spec import load_bundle


def _section(text: str, key: str) -> str:
    match = re.search(rf'<section id="{key}">(.*?)</section>', text, re.S)
    assert match, f"no section {key}"
    return match.group(1)


def _rows(html_part: str) -> list[list[str]]:
    """Each table row's cells, as text."""
    rows = [
        [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", html_part, re.S)
    ]
    return [r for r in rows if r]  # header rows hold <th> only


def _sources_of_test_images(split: Path) -> Counter:
    """The source data set of each test image, read independently of fedbridge's code."""
    manifest = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "MANIFEST.csv"
    base = manifest.parent.resolve()
    source_of = {
        str((base / r["path"]).resolve()): r["source_dataset"]
        for r in csv.DictReader(manifest.open())
    }
    rows = csv.DictReader((split / "split.csv").open())
    return Counter(source_of[str(Path(r["source"]).resolve())] for r in rows if r["part"] == "test")


def test_federated_report_shows_sites_lineage_and_sources(fed, tmp_path):
    root, split = fed
    out = tmp_path / "fed"
    flat = {
        "init": str(root / "bridge"), "out": str(out), "num-server-rounds": 2,
        "augment-per-sample": 1, "batch-size": 32, "min-train-sites": 3,
        "min-evaluate-sites": 3, "min-available-sites": 3, "lr": 1e-3, "seed": 5,
    }  # fmt: skip
    sites = [split / f"site-{i}" for i in (1, 2, 3)]
    simulate(flat, sites, out=Console(file=open("/dev/null", "w")))  # noqa: SIM115
    report = tmp_path / "report"
    ok("evaluate", out, split / "test", "--out", report, "--bootstrap", "100")
    text = (report / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((report / "metrics.json").read_text())
    bundle, bridge = load_bundle(out), load_bundle(root / "bridge")
    history, best = bundle.training["history"], bundle.training["best_round"]

    shown = re.findall(r'<section id="([a-z_]+)">', text)
    assert shown == [s for s in SECTIONS if s != "sanity"]
    assert '<meta name="viewport"' in text and "<script" not in text
    assert text.count("<table") == text.count('<div class="scroll"><table')

    # images per class at each site, from the rounds' per_site (train and validation)
    last = history[-1]["per_site"]
    count_rows = {r[0]: r[1:] for r in _rows(_section(text, "counts"))}
    for name, site in last.items():
        labels = list(bundle.spec.labels)
        want = [str(site["train_counts"][k]) for k in labels]
        assert count_rows[f"{name}: train"] == [*want, str(sum(map(int, want)))]
        assert count_rows[f"{name}: validation"][:-1] == [
            str(site["val_counts"][k]) for k in labels
        ]

    # each site's validation accuracy per round; ★ on the round kept
    per_round = _rows(_section(text, "sites"))[-len(history) :]
    for row, cells in zip(history, per_round, strict=True):
        assert cells[0] == f"{row['round']}{' ★' if row['round'] == best else ''}"
        assert cells[1:4] == [f"{row['per_site'][n]['val_accuracy']:.3f}" for n in sorted(last)]

    # the final model on each site's validation data beside the test set
    cross = _rows(_section(text, "cross_site"))
    kept = history[best - 1]["per_site"]
    for cells, name in zip(cross, sorted(kept), strict=False):
        assert cells[:3] == [
            f"{name} validation", str(kept[name]["val_examples"]),
            f"{kept[name]['val_accuracy']:.3f}",
        ]  # fmt: skip
    assert cross[3][:3] == ["test: test", str(metrics["n"]), f"{metrics['accuracy']:.3f}"]
    # and each class's sensitivity there: the sites' correct counts over their images
    labels = list(bundle.spec.labels)
    for cells, name in zip(cross[4:7], sorted(kept), strict=True):
        s = kept[name]
        want = [s["val_correct"][c] / s["val_counts"][c] for c in labels]
        assert cells == [f"{name} validation", *(f"{v:.3f}" for v in want)]
        assert sum(s["val_correct"].values()) == round(s["val_accuracy"] * s["val_examples"])
    sens_test = [metrics["per_class"][c]["sensitivity"] for c in labels]
    assert cross[7] == ["test: test", *(f"{v:.3f}" for v in sens_test)]

    # lineage: random init → the bridge bundle (its data, sha) → 2 rounds → this bundle
    lineage = _section(text, "lineage")
    assert lineage.index("random initialisation") < lineage.index(bridge.sha256)
    assert "stage bridge" in lineage and str((split / "bridge").resolve()) in lineage
    assert "2 federated round(s)" in lineage and bundle.sha256 in lineage

    # model card: accuracy per real source, and the COVID19 source confound named
    card = _section(text, "card")
    per_source = {r[0]: r for r in _rows(card) if r[0] in _sources_of_test_images(split)}
    assert {k: int(r[1]) for k, r in per_source.items()} == _sources_of_test_images(split)
    assert "every COVID19 test image comes from ieee8023-covid-chestxray-dataset" in card
    assert "not a medical device" in card

    # per-class CIs, calibration, and a caption true to the unsigned saliency map
    sens = metrics["per_class_ci95"]["COVID19"]["sensitivity"]
    assert f"{sens[0]:.3f} – {sens[1]:.3f}" in _section(text, "metrics")
    assert f"ECE) {metrics['calibration']['ece']:.3f}" in _section(text, "calibration")
    saliency = _section(text, "saliency")
    assert "unsigned" in saliency and "inferno" in saliency and "red pushes" not in saliency
