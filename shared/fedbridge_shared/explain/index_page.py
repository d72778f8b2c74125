"""``index.html`` of an explain output folder: every image's prediction and maps on one page.

The page links the PNGs beside it (``<method>/<name>.png``, relative), so the folder can be
moved or zipped as a whole; no script, stylesheet or font is fetched. Captions say how each
method's map reads (signed ``bwr`` around 0, or unsigned ``inferno`` from 0), with a colour bar.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from fedbridge_shared import __version__
from fedbridge_shared.colours import SIGNED_CMAP, UNSIGNED_CMAP
from fedbridge_shared.explain.methods import SIGNED_METHODS
from fedbridge_shared.explain.overlay import colourbar_png
from fedbridge_shared.explain.regions import REGIONS
from fedbridge_shared.html_report import CSS, sanity_section
from fedbridge_shared.report_sections import esc, fmt, muted, section, table

INDEX_FILE = "index.html"

_EXTRA_CSS = """
.item{border:1px solid #d0d7de;border-radius:6px;padding:.5rem .8rem;margin:.8rem 0}
.item.wrong{border-color:#cf222e}.item h3{margin:.2rem 0;font-size:1rem;overflow-wrap:anywhere}
.item img{max-width:100%;height:auto}
"""


def method_caption(method: str) -> str:
    """How a map of ``method`` reads, in one sentence."""
    if method in SIGNED_METHODS:
        return (
            f"{method} is signed, drawn in {SIGNED_CMAP} around 0: red pixels raise the score of "
            "the explained class, blue pixels lower it, white is no effect."
        )
    return (
        f"{method} is unsigned, drawn in {UNSIGNED_CMAP} from 0: brighter pixels affect the "
        "score of the explained class more, in either direction."
    )


def _bar(signed: bool) -> str:
    data = base64.b64encode(colourbar_png(signed)).decode("ascii")
    return f'<img class="bar" alt="colour scale" src="data:image/png;base64,{data}">'


def _legend(methods: list[str]) -> str:
    rows = "".join(
        f"<p><b>{esc(m)}</b>: {esc(method_caption(m))}</p>{_bar(m in SIGNED_METHODS)}"
        for m in methods
    )
    note = muted(
        "Each map is scaled on its own, to its 99th percentile of |map| (the colour bar's end), "
        "and fades where it is near 0 so the image shows through."
    )
    return section("legend", "How to read the maps", rows + note)


def _item(name: str, rows: list[Mapping[str, Any]]) -> str:
    first = rows[0]
    wrong = first["true_label"] is not None and first["true_label"] != first["predicted"]
    title = f"{first['file'].rsplit('/', 1)[-1]}: predicted {first['predicted']} "
    title += f"({first['probability']:.2f})"
    if first["true_label"]:
        title += f", true {first['true_label']}" + (" ✗" if wrong else " ✓")
    if first["target"] != first["predicted"]:
        title += f"; maps explain {first['target']}"
    figures = "".join(
        f'<figure><img alt="{esc(r["method"])} map of {esc(name)}" loading="lazy" '
        f'src="{quote(r["overlay"])}"><figcaption class="muted">{esc(r["method"])}: '
        + ", ".join(f"{k} {fmt(r.get(k), 2)}" for k in REGIONS)
        + "</figcaption></figure>"
        for r in rows
    )
    cls = "item wrong" if wrong else "item"
    return f'<div class="{cls}" id="img-{esc(name)}"><h3>{esc(title)}</h3>{figures}</div>'


def _summary(record: Mapping[str, Any]) -> str:
    rows = []
    for method, groups in record["class_summary"].items():
        for cls, v in groups.get("predicted", {}).items():
            rows.append((method, cls, v["n"], *(v.get(r) for r in REGIONS)))
    body = table(("method", "predicted class", "n", *REGIONS), rows) + muted(
        "Share of |map| in the image halves, the centre and the border band. Much more mass on "
        "one side or in the border (text markers, collimation, a hospital's framing) suggests "
        "a shortcut."
    )
    return section("regions", "Where the maps put their mass", body)


def render_index(record: Mapping[str, Any]) -> str:
    """The page for an explain run record (``explain.json``)."""
    methods = list(record["methods"])
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for row in record["rows"]:
        by_name.setdefault(row["name"], []).append(row)
    bundle = record["bundle"]
    head = f"<h1>fedbridge explain: {esc(record['n_images'])} image(s)</h1>" + muted(
        f"fedbridge {esc(__version__)} · model {esc(bundle['path'])} · weights sha256 "
        f"{esc(bundle['sha256'][:16])}… · labels {esc(', '.join(record['labels']))} · "
        f"{esc(record['image_size'])} px · maps of the {esc(record['target'])}. "
        "Research use only: not a diagnosis."
    )
    body = [head, _legend(methods)]
    if record.get("sanity"):
        body.append(sanity_section(record["sanity"]))
    body.append(_summary(record))
    items = "".join(_item(name, rows) for name, rows in by_name.items())
    body.append(section("images", "Images", items))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>fedbridge explain</title><style>{CSS}{_EXTRA_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
