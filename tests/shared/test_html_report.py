"""The self-contained HTML report: sections, embedded images, and a render in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from fedbridge_shared.explain.grid import SaliencyExample, pick_examples
from fedbridge_shared.explain.overlay import thumbnail_png
from fedbridge_shared.html_report import SECTIONS, write_html_report
from fedbridge_shared.metrics import compute_metrics

LABELS = ["CNV", "DME", "DRUSEN", "NORMAL"]


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
    rounds = [
        {"round": r, "train_loss": 1.0 / r, "federated_val_accuracy": 0.5 + 0.1 * r}
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
    )
    return path, metrics, examples


def test_report_has_every_section_and_only_embedded_images(report):
    path, metrics, examples = report
    assert path.name == "report.html" and not list(path.parent.glob(".*tmp"))
    text = path.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(text)
    assert parser.sections == list(SECTIONS)
    # confusion + ROC + rounds + one thumbnail per saliency example, all inline PNGs
    assert len(parser.imgs) == 3 + len(examples)
    assert all(src.startswith("data:image/png;base64,") for src in parser.imgs)
    assert parser.links == [] and "script" not in parser.tags  # nothing fetched or run
    assert "OCT &lt;test&gt; report" in text  # user text is escaped
    assert f"{metrics['accuracy']:.3f}" in text
    lo, hi = metrics["ci95"]["accuracy"]
    assert f"{lo:.3f} – {hi:.3f}" in text
    assert "fails sanity check" in text and "Federated rounds" in text
    assert text.count('class="cell wrong"') == sum(not e.correct for e in examples)


def test_pick_examples_takes_confident_correct_then_wrong_per_class():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.55, 0.45]])
    assert pick_examples(y, p, per_class=1) == [0, 2, 3, 4]
    assert pick_examples(y, p, per_class=2) == [0, 1, 2, 3, 4]


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium on this machine")
def test_report_renders_in_headless_chromium(report, tmp_path):
    path, _, _ = report
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=1200,1600", path.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 5  # not a blank page
