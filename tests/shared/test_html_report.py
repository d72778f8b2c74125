"""The self-contained HTML report: sections, embedded images, and a render in headless Chromium."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pytest

from fedbridge_shared.explain.grid import SaliencyExample, pick_examples
from fedbridge_shared.explain.overlay import thumbnail_png
from fedbridge_shared.html_report import SECTIONS, write_html_report
from fedbridge_shared.metrics import compute_metrics

LABELS = ["CNV", "DME", "DRUSEN", "NORMAL"]
# CNV only from source "A"; the rest alternate between "A" and "B" (the last 4 unknown)
SOURCES = ["A"] * 10 + ["A", "B"] * 13 + [None] * 4


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag in ("link", "script", "a") or "href" in a:
            self.links.append(a.get("href") or a.get("src") or "")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    probs = rng.dirichlet(np.ones(4), size=40)
    probs[np.arange(40), y] += 0.6
    probs /= probs.sum(axis=1, keepdims=True)
    metrics = compute_metrics(y, probs, LABELS, n_bootstrap=100)
    image = (rng.random((48, 48)) * 255).astype(np.uint8)
    examples = [
        SaliencyExample(
            path=f"/data/{LABELS[int(y[i])]}/img{i}.png",
            true_label=LABELS[int(y[i])],
            predicted=LABELS[int(probs[i].argmax())],
            probability=float(probs[i].max()),
            correct=bool(probs[i].argmax() == y[i]),
            method="shap",
            png=thumbnail_png(image, rng.normal(size=(48, 48)), "shap"),
            regions={"left": 0.6, "right": 0.4, "centre": 0.3, "border": 0.7, "border_area": 0.5},
        )
        for i in pick_examples(y, probs, per_class=2)
    ]
    site_counts = {"CNV": 3, "DME": 2, "DRUSEN": 0, "NORMAL": 4}
    rounds = [
        {
            "round": r,
            "train_loss": 1.0 / r,
            "federated_val_accuracy": 0.5 + 0.1 * r,
            "per_site": {
                name: {
                    "train_examples": 9,
                    "train_counts": site_counts,
                    "train_loss": 1.0,
                    "train_accuracy": 0.5,
                    "val_examples": 9,
                    "val_counts": site_counts,
                    "val_loss": 1.0 / r,
                    "val_accuracy": 0.4 + 0.1 * r + 0.05 * i,
                }
                for i, name in enumerate(("site-b", "site-a"))
            },
        }  # fmt: skip
        for r in (1, 2, 3)
    ]
    sanity = {
        "randomisation": "all layers re-initialised",
        "threshold": 0.5,
        "n_images": 4,
        "methods": {
            "saliency": {"rho": [0.1], "mean_abs_rho": 0.1, "fails": False},
            "ig": {"rho": [0.9], "mean_abs_rho": 0.9, "fails": True},
        },
    }
    out = tmp_path_factory.mktemp("report")
    path = write_html_report(
        out,
        title="OCT <test> report",
        config={"bundle": "b", "training config": {"lr": 0.001}},
        counts={"site-1": {"CNV": 5, "DME": 5}, "test": {label: 10 for label in LABELS}},
        metrics=metrics,
        y_true=y,
        probs=probs,
        rounds=rounds,
        saliency_examples=examples,
        sanity=sanity,
        card={"arch": "tiny", "image_size": 48, "stage": "federated", "label_map": None},
        lineage=[{"step": "ImageNet weights", "detail": "w.safetensors; sha256 abc"}],
        best_round=2,
        sources=SOURCES,
    )
    return path, metrics, examples


def test_report_has_every_section_and_only_embedded_images(report):
    path, metrics, examples = report
    assert path.name == "report.html" and not list(path.parent.glob(".*tmp"))
    text = path.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(text)
    assert parser.sections == list(SECTIONS)
    # confusion, calibration, ROC, sites, rounds, colour bar + one thumbnail per example
    assert len(parser.imgs) == 6 + len(examples)
    assert all(src.startswith("data:image/png;base64,") for src in parser.imgs)
    assert parser.links == [] and "script" not in parser.tags  # nothing fetched or run
    assert "OCT &lt;test&gt; report" in text  # user text is escaped
    assert f"{metrics['accuracy']:.3f}" in text
    lo, hi = metrics["ci95"]["accuracy"]
    assert f"{lo:.3f} – {hi:.3f}" in text
    assert "fails sanity check" in text and "Federated rounds" in text
    assert text.count('class="cell wrong"') == sum(not e.correct for e in examples)


def _section(text: str, key: str) -> str:
    return text.split(f'<section id="{key}">')[1].split("</section>")[0]


def _rows(part: str) -> list[list[str]]:
    rows = [r.split("</tr>")[0] for r in part.split("<tr>")[1:]]
    cells = [[c.split("</td>")[0] for c in r.split("<td>")[1:]] for r in rows]
    return [c for c in cells if c]  # header rows hold <th> only


def test_report_reads_at_600px_and_shows_sites_card_and_intervals(report):
    path, metrics, _ = report
    text = path.read_text(encoding="utf-8")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    assert text.count("<table") == text.count('<div class="scroll"><table') > 5
    assert ".scroll{overflow-x:auto" in text and "img.fig{max-width:100%" in text
    # per-class CIs beside the values
    lo, hi = metrics["per_class_ci95"]["DME"]["specificity"]
    assert f"{lo:.3f} – {hi:.3f}" in _section(text, "metrics")
    # sites in name order, round 2 starred as the final model; cross-site uses round 2
    per_round = _rows(_section(text, "sites"))[-3:]
    assert per_round[1][:3] == ["2 ★", "0.650", "0.600"]
    cross = _rows(_section(text, "cross_site"))
    assert [c[:3] for c in cross[:2]] == [["site-a validation", "9", "0.650"],
                                          ["site-b validation", "9", "0.600"]]  # fmt: skip
    assert cross[2][:3] == ["test set", "40", f"{metrics['accuracy']:.3f}"]
    # per-source accuracy, the confound, and the signed (shap) caption with its colour map
    card = _section(text, "card")
    right = np.asarray(metrics["confusion_matrix"]).trace()
    assert [r[:2] for r in _rows(card) if r[0] in ("A", "B", "unknown")] == [
        ["A", "23"], ["B", "13"], ["unknown", "4"]]  # fmt: skip
    assert "every CNV test image comes from A" in card and right > 0
    assert "Source confound" in card and "not a medical device" in card
    saliency = _section(text, "saliency")
    assert "bwr" in saliency and "red pixels raise" in saliency and "inferno" not in saliency


def test_unsigned_saliency_caption_and_per_source_accuracy(report, tmp_path):
    _, metrics, examples = report
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 10)
    probs = np.eye(4)[y] * 0.7 + 0.075
    probs[:5] = [0.1, 0.7, 0.1, 0.1]  # 5 CNV images wrong, all from source "A"
    plain = [
        SaliencyExample(**{**e.__dict__, "method": "saliency",
                           "png": thumbnail_png(np.zeros((8, 8)), rng.random((8, 8)), "saliency")})
        for e in examples
    ]  # fmt: skip
    path = write_html_report(
        tmp_path, title="t", config={}, counts={}, metrics=compute_metrics(y, probs, LABELS, 50),
        y_true=y, probs=probs, saliency_examples=plain, card={"synthetic": True}, sources=SOURCES,
    )  # fmt: skip
    text = path.read_text(encoding="utf-8")
    saliency = _section(text, "saliency")
    assert "unsigned" in saliency and "inferno" in saliency and "red pixels" not in saliency
    rows = {r[0]: r for r in _rows(_section(text, "card"))}
    assert rows["A"][1] == "23" and rows["A"][-2] == f"{18 / 23:.3f}"
    assert rows["B"][-2] == "1.000"
    assert "<b>Synthetic data</b>" in text
    assert "sites" not in re.findall(r'<section id="([a-z_]+)"', text)


def test_pick_examples_takes_confident_correct_then_wrong_per_class():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.55, 0.45]])
    assert pick_examples(y, p, per_class=1) == [0, 2, 3, 4]
    assert pick_examples(y, p, per_class=2) == [0, 1, 2, 3, 4]
