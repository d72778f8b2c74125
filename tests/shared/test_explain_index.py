"""index.html of an explain folder, from a run record: escaping, quoted sources, legends, tables.

The page of a real run, in a real browser, is tested in tests/e2e/test_browser.py.
"""

from __future__ import annotations

from html.parser import HTMLParser

from fedbridge_shared.explain.index_page import render_index

LABELS = ["<b>A</b>", "B & C"]
NAME = "<script>alert(1)</script>"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def _record(methods: list[str], sanity: dict | None = None) -> dict:
    row = {
        "file": f"/data/x/{NAME}.png",
        "name": NAME,
        "true_label": LABELS[1],
        "predicted": LABELS[0],
        "probability": 0.75,
        "target": LABELS[0],
        "target_probability": 0.75,
        **{r: 0.5 for r in ("left", "right", "centre", "border", "border_area")},
    }
    summary = {"n": 1, "left": 0.5, "right": 0.5, "centre": 0.5, "border": 0.5}
    return {
        "bundle": {"path": "/b/<x>", "sha256": "ab" * 32},
        "labels": LABELS,
        "image_size": 64,
        "methods": methods,
        "target": "predicted class",
        "n_images": 1,
        "rows": [{**row, "method": m, "overlay": f"{m}/{NAME}.png"} for m in methods],
        "class_summary": {m: {"predicted": {LABELS[0]: summary}} for m in methods},
        **({"sanity": sanity} if sanity else {}),
    }


def test_every_name_and_label_is_escaped_and_each_src_quoted():
    text = render_index(_record(["saliency", "shap"]))
    parser = _Tags()
    parser.feed(text)
    assert "script" not in parser.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;b&gt;A&lt;/b&gt;" in text
    assert "B &amp; C" in text and "/b/&lt;x&gt;" in text
    overlays = [s for s in parser.srcs if not s.startswith("data:")]
    assert overlays == [
        "saliency/%3Cscript%3Ealert%281%29%3C/script%3E.png",
        "shap/%3Cscript%3Ealert%281%29%3C/script%3E.png",
    ]
    assert len(parser.srcs) - len(overlays) == 2  # one colour bar per method
    assert (
        "saliency is unsigned, drawn in inferno" in text and "shap is signed, drawn in bwr" in text
    )
    assert "✗" in text and 'class="item wrong"' in text  # predicted A, true B & C
    assert '<meta name="viewport"' in text


def test_sanity_table_only_with_a_sanity_check_and_undefined_said_so():
    assert "Sanity check" not in render_index(_record(["saliency"]))
    sanity = {
        "n_images": 1,
        "randomisation": "all layers re-initialised",
        "threshold": 0.5,
        "methods": {
            "saliency": {"mean_abs_rho": 0.9, "fails": True},
            "gradcam": {"mean_abs_rho": None, "fails": False},
        },
    }
    text = render_index(_record(["saliency", "gradcam"], sanity))
    assert '<td class="fail">fails sanity check</td>' in text
    assert "undefined (constant maps)" in text
