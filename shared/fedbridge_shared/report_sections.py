"""Sections of the HTML report about where a model came from and whom it serves.

``card`` (model card: intended use, data, per-source accuracy, known limitations), ``lineage``
(ImageNet weights → bridge bundle → target/federated rounds → this bundle), ``sites`` (images
per class at each site and each site's validation numbers per round) and ``cross_site`` (the
final model on each site's validation data beside the test set). Plain HTML helpers too.
"""

from __future__ import annotations

import base64
import html
import json
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedbridge_shared import rounds as R
from fedbridge_shared.metrics import cross_entropy, wilson_interval

UNKNOWN = "unknown"


def esc(value: Any) -> str:
    """HTML-escaped text; invisible and bidirectional control characters (a right-to-left
    override in a name) are written as visible ``\\u202e`` escapes, never raw."""
    text = "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cf", "Cc") and c not in "\t\n" else c
        for c in str(value)
    )
    return html.escape(text, quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def fmt_ci(interval: Sequence[float] | None) -> str:
    return "–" if not interval else f"{interval[0]:.3f} – {interval[1]:.3f}"


def png_img(png: bytes, alt: str, cls: str = "fig") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """A table in its own horizontally scrolling box (a narrow window never cuts it off)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return (
        f'<div class="scroll"><table{attr}><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{esc(title)}</h2>{body}</section>'


def muted(text: str) -> str:
    return f'<p class="muted">{text}</p>'


# --------------------------------------------------------------------------------------------
# lineage


def lineage_steps(spec: Any, training: Mapping[str, Any], sha256: str) -> list[dict[str, str]]:
    """The steps from the first weights to this bundle, oldest first: ``{step, detail}``.

    Walks ``spec.init`` and its ``previous_init`` chain; a bundle step whose folder still holds
    the recorded weights (same sha256) adds its stage, data and image count.
    """
    chain, init = [], dict(spec.init or {})
    while init:
        chain.append(init)
        init = dict(init.get("previous_init") or {})
    steps = [_init_step(i) for i in reversed(chain)]
    steps.append({"step": f"this bundle ({training.get('stage') or 'unknown stage'})",
                  "detail": _stage_detail(training) + f"; weights sha256 {sha256}"})  # fmt: skip
    return steps


def _init_step(init: Mapping[str, Any]) -> dict[str, str]:
    kind = init.get("kind")
    sha = f"; sha256 {init['sha256']}" if init.get("sha256") else ""
    if kind == "none":
        return {"step": "random initialisation", "detail": "no pretrained weights"}
    if kind in ("imagenet", "file"):
        source, what = init.get("source", ""), init.get("description")
        name = "ImageNet weights" if kind == "imagenet" else "weights file"
        return {"step": name, "detail": (f"{what} ({source})" if what else source) + sha}
    if kind != "bundle":
        return {"step": str(kind), "detail": json.dumps(init, default=str)}
    detail, name = f"{init.get('source', '')}{sha}", "bundle"
    upstream = _upstream_record(init)
    if upstream is not None:
        detail += "; " + _stage_detail(upstream.get("training") or {})
        name = f"{(upstream.get('training') or {}).get('stage') or 'earlier'} bundle"
    if init.get("label_map"):
        rows = [f"{t} ← {s}" if s else f"{t} new" for t, s in init["label_map"].items()]
        detail += (
            f"; classifier {init.get('head')}: from {', '.join(init.get('source_labels', []))} "
            f"to {', '.join(rows)}"
        )
    return {"step": name, "detail": detail}


def _upstream_record(init: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model.json of the bundle ``init`` names, if it is still there with the same weights."""
    from fedbridge_shared.errors import BundleError
    from fedbridge_shared.spec import read_bundle_record

    try:
        record = read_bundle_record(Path(init.get("source", "")))
    except (BundleError, OSError):
        return None
    return record if record.get("weights_sha256") == init.get("sha256") else None


def _stage_detail(training: Mapping[str, Any]) -> str:
    stage = training.get("stage") or "unknown stage"
    parts = [f"stage {stage}"]
    folders = training.get("folders") or []
    if len(folders) > 1:
        parts.append(
            "data "
            + " + ".join(
                f"{f['path']} ({', '.join(f'{k} {v}' for k, v in f['counts'].items())})"
                for f in folders
            )
        )
    elif training.get("data"):
        parts.append(f"data {training['data']}")
    counts = training.get("counts") or {}
    if counts:
        shown = ", ".join(f"{k} {sum(v.values())}" for k, v in counts.items())
        parts.append(f"images: {shown}")
    if training.get("rounds"):
        sites = sorted({s for r in training.get("history") or [] for s in r.get(R.SITES) or []})
        parts.append(
            f"{training['rounds']} federated round(s), best round {training.get('best_round')}"
            + (
                f" ({training['best_round_chosen_by']})"
                if training.get("best_round_chosen_by")
                else ""
            )
            + (f", sites {', '.join(sites)}" if sites else "")
        )
    elif training.get("history"):
        parts.append(f"{len(training['history'])} epoch(s)")
    return "; ".join(parts)


def lineage_section(steps: Sequence[Mapping[str, str]]) -> str:
    rows = [(f"{i}. {s['step']}", s["detail"]) for i, s in enumerate(steps, start=1)]
    return section("lineage", "Lineage", table(("step", "what"), rows, cls="kv"))


# --------------------------------------------------------------------------------------------
# sites


def site_rows(rounds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each site's latest ``per_site`` entry (its image counts do not change between rounds)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rounds:
        latest.update(row.get(R.PER_SITE) or {})
    return dict(sorted(latest.items()))


def sites_section(
    rounds: Sequence[Mapping[str, Any]], labels: Sequence[str], best_round: int | None
) -> str:
    from fedbridge_shared.report import plot_site_rounds

    sites = site_rows(rounds)
    count_rows = []
    for name, s in sites.items():
        for part, key in (("train", "train_counts"), ("validation", "val_counts")):
            values = [int((s.get(key) or {}).get(label, 0)) for label in labels]
            count_rows.append((name, part, *values, sum(values)))
    names = list(sites)
    per_round = []
    for row in rounds:
        mine = row.get(R.PER_SITE) or {}
        cells = [
            mine[n]["val_accuracy"] if mine.get(n, {}).get("val_examples") else None for n in names
        ]
        mark = " ★" if row.get(R.ROUND) == best_round else ""
        per_round.append(
            (f"{row.get(R.ROUND)}{mark}", *cells, row.get(R.FEDERATED_VAL_ACCURACY),
             row.get(R.SERVER_VAL_ACCURACY))
        )  # fmt: skip
    body = (
        "<h3>Images per class at each site</h3>"
        + table(("site", "part", *labels, "total"), count_rows)
        + "<h3>Each site's validation accuracy of the global model, per round</h3>"
        + table(("round", *names, "federated (weighted)", "server validation"), per_round)
        + muted(
            "After each round the new global weights are evaluated on every site's own "
            "validation patients; ★ marks the round kept as the final model. Sites report "
            "numbers only, never images."
        )
        + png_img(plot_site_rounds(rounds), "each site's validation loss and accuracy per round")
    )
    return section("sites", "Sites", body)


def _ratio(k: int | None, n: int | None) -> float | None:
    return k / n if k is not None and n else None


def test_loss(y_true: Any, probs: Any) -> float:
    """Mean cross-entropy −log p(true class), as sites compute their validation loss."""
    return cross_entropy(y_true, probs)


def cross_site_section(
    rounds: Sequence[Mapping[str, Any]],
    best_round: int | None,
    metrics: Mapping[str, Any],
    y_true: Any,
    probs: Any,
    test_name: str,
) -> str:
    best = next((r for r in rounds if r.get(R.ROUND) == best_round), rounds[-1])
    rows: list[tuple[str, int, float | None, str, float | None]] = []
    for name, s in sorted((best.get(R.PER_SITE) or {}).items()):
        n = int(s.get("val_examples") or 0)
        if not n:
            rows.append((f"{name} validation", 0, None, "–", None))
            continue
        acc = float(s["val_accuracy"])
        rows.append(
            (f"{name} validation", n, acc, fmt_ci(wilson_interval(round(acc * n), n)),
             float(s["val_loss"]))
        )  # fmt: skip
    rows.append(
        (test_name, metrics["n"], metrics["accuracy"],
         fmt_ci((metrics.get("ci95") or {}).get("accuracy")), test_loss(y_true, probs))
    )  # fmt: skip
    body = table(("data", "images", "accuracy", "95% CI", "loss"), rows) + muted(
        f"The final model (round {esc(best.get(R.ROUND))}) on each site's validation patients "
        "(reported by the sites; Wilson interval) and on the held-out test set (percentile "
        "bootstrap). A site far below the others is one the model does not serve."
    )
    labels = list(metrics["labels"])
    sens_rows = [
        (f"{name} validation",
         *(_ratio((s.get("val_correct") or {}).get(c), (s.get("val_counts") or {}).get(c))
           for c in labels))
        for name, s in sorted((best.get(R.PER_SITE) or {}).items())
        if s.get("val_correct")
    ]  # fmt: skip
    if sens_rows:
        test_sens = [metrics["per_class"][c]["sensitivity"] for c in labels]
        body += "<h3>Sensitivity per class</h3>" + table(
            ("data", *labels), [*sens_rows, (test_name, *test_sens)]
        )
    return section("cross_site", "Final model on each site's data and the test set", body)


# --------------------------------------------------------------------------------------------
# model card


def per_source_rows(
    y_true: Any, probs: Any, labels: Sequence[str], sources: Sequence[str | None]
) -> list[tuple[Any, ...]]:
    """(source, images, images per class …, accuracy, 95% CI) per source of the test images."""
    y = np.asarray(y_true, dtype=np.int64)
    right = np.asarray(probs).argmax(axis=1) == y
    names = [s or UNKNOWN for s in sources]
    rows = []
    for source in sorted(set(names)):
        mine = np.asarray([n == source for n in names])
        per_class = np.bincount(y[mine], minlength=len(labels))
        k, n = int(right[mine].sum()), int(mine.sum())
        rows.append((source, n, *(int(c) for c in per_class), k / n, fmt_ci(wilson_interval(k, n))))
    return rows


def limitations(
    *,
    metrics: Mapping[str, Any],
    labels: Sequence[str],
    y_true: Any,
    sources: Sequence[str | None] | None,
    card: Mapping[str, Any],
    sites: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    """Known limitations, read off the numbers (each one sentence of HTML)."""
    out = []
    if card.get("synthetic"):
        out.append(
            "<b>Synthetic data</b>: trained and tested on generated phantom images; these "
            "numbers say nothing about patients."
        )
    y = np.asarray(y_true, dtype=np.int64)
    known = [s for s in sources or [] if s]
    if len(set(known)) >= 2:
        for c, label in enumerate(labels):
            mine = Counter(s or UNKNOWN for s, t in zip(sources or [], y, strict=True) if t == c)
            if len(mine) == 1 and sum(mine.values()) > 0:
                (only,) = mine
                out.append(
                    f"<b>Source confound</b>: every {esc(label)} test image comes from "
                    f"{esc(only)}. The model may recognise the source (hospital, scanner, "
                    "text markers, framing) instead of the disease; compare the per-source "
                    "accuracy above and the saliency maps' border mass."
                )
    elif not known:
        out.append(
            "The test images' source data sets are unknown (no manifest with a source_dataset "
            "column lists them), so a source confound cannot be checked here."
        )
    ci = (metrics.get("ci95") or {}).get("accuracy")
    if ci and ci[1] - ci[0] > 0.1:
        out.append(
            f"Small test set: {metrics['n']} images; the 95% CI of accuracy spans "
            f"{ci[0]:.3f} – {ci[1]:.3f}."
        )
    cal = metrics.get("calibration") or {}
    if cal.get("ece") is not None and cal["ece"] > 0.05:
        out.append(
            f"Probabilities are not calibrated (ECE {cal['ece']:.3f}): do not read a score "
            "as the chance of disease."
        )
    for name, s in sites.items():
        missing = [label for label in labels if not (s.get("val_counts") or {}).get(label)]
        if missing:
            out.append(
                f"Site {esc(name)} has no validation images of {esc(', '.join(missing))}: its "
                "validation accuracy says nothing about those classes."
            )
    size = card.get("image_size")
    if size and size < 128:
        out.append(f"Trained at {size} px: fine detail of the images is lost.")
    for t, s in (card.get("label_map") or {}).items():
        if s is None:
            out.append(f"{esc(t)} was not in the bridge data: it is learned from target data only.")
    if (metrics.get("shortcut") or {}).get("flagged"):
        from fedbridge_shared.shortcut import FLAG_TEXT

        out.append(
            f"<b>Shortcut</b>: {FLAG_TEXT} — " + esc(probe_sentence(metrics["shortcut"]["probe"]))
        )
    if not card.get("privacy") and card.get("stage") == "federated":
        out.append("Trained without differential privacy: updates may leak site data.")
    return out


def card_section(
    *,
    card: Mapping[str, Any],
    metrics: Mapping[str, Any],
    labels: Sequence[str],
    y_true: Any,
    probs: Any,
    sources: Sequence[str | None] | None,
    counts: Mapping[str, Mapping[str, int]],
    sites: Mapping[str, Mapping[str, Any]],
) -> str:
    """Intended use, data, performance (per source when known) and known limitations."""
    use = (
        f"A research model: a {esc(card.get('arch', 'classifier'))} at "
        f"{esc(card.get('image_size', '?'))} px that sorts an image into one of "
        f"{esc(', '.join(labels))}. For assessing federated bridge transfer learning, not for "
        "diagnosis: it is not a medical device and has not been clinically validated. Use it "
        "only on images like its training data (same modality, view and preprocessing); a "
        "clinician reads every image."
    )
    data_rows = [(part, sum(v.values())) for part, v in counts.items()]
    perf = (
        f"Accuracy {fmt(metrics.get('accuracy'))} (95% CI "
        f"{fmt_ci((metrics.get('ci95') or {}).get('accuracy'))}), macro AUC "
        f"{fmt(metrics.get('macro_auc'))}, ECE {fmt((metrics.get('calibration') or {}).get('ece'))}"
        f" on {esc(metrics.get('n'))} test images."
    )
    body = (
        f"<h3>Intended use</h3><p>{use}</p><h3>Data</h3>"
        + table(("part", "images"), data_rows)
        + f"<h3>Performance</h3><p>{perf}</p>"
    )
    if sources and any(sources):
        body += "<h3>Accuracy per source data set</h3>" + table(
            ("source", "images", *labels, "accuracy", "95% CI (Wilson)"),
            per_source_rows(y_true, probs, labels, sources),
        )
    items = limitations(
        metrics=metrics, labels=labels, y_true=y_true, sources=sources, card=card, sites=sites
    )
    body += "<h3>Known limitations</h3><ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
    return section("card", "Model card", body)


# --------------------------------------------------------------------------------------------
# shortcut audit (metrics["shortcut"], metrics["external"]; see fedbridge_shared.shortcut)


def _pct(rate: Mapping[str, Any] | None) -> str:
    if not rate or rate.get("rate") is None:
        return "–"
    return f"{rate['k']} of {rate['n']} ({100 * rate['rate']:.1f} %)"


def probe_sentence(probe: Mapping[str, Any]) -> str:
    """The source probe beside the label probe, in one sentence (plain text)."""
    src, lab = probe.get("source") or {}, probe.get("label") or {}
    if not (src.get("available") and lab.get("available")):
        why = src.get("reason") if not src.get("available") else lab.get("reason")
        return f"Source probe not run: {why}."
    text = (
        f"A linear probe on the model's {probe.get('features')} pooled features reads the source "
        f"with balanced accuracy {src['balanced_accuracy']:.3f} (chance {src['chance']:.3f}, "
        f"adjusted {src['adjusted']:.3f}) and the label with {lab['balanced_accuracy']:.3f} "
        f"(chance {lab['chance']:.3f}, adjusted {lab['adjusted']:.3f}); "
        f"{src['folds']}/{lab['folds']}-fold cross-validation grouped by patient."
    )
    if probe.get("flagged"):
        from fedbridge_shared.shortcut import FLAG_TEXT

        text += f" Flag: {FLAG_TEXT[0].upper() + FLAG_TEXT[1:]}."
    return text


def audit_summary(metrics: Mapping[str, Any]) -> list[str]:
    """The audit and the external scores as plain lines (terminal output, benchmarks)."""
    lines = []
    audit = metrics.get("shortcut") or {}
    positive = audit.get("positive")
    for source, s in (audit.get("per_source") or {}).items():
        line = f"source {source}: n {s['n']}, accuracy {s['accuracy']:.3f}"
        if positive:
            called = s.get(f"non_{positive}_called_{positive}")
            line += f", non-{positive} called {positive}: {_pct(called)}"
        lines.append(line)
    if audit.get("probe"):
        lines.append(probe_sentence(audit["probe"]))
    ext = metrics.get("external")
    if ext and "accuracy" in ext:
        lines.append(f"external, under the label mapping: accuracy {_pct(ext['accuracy'])}")
        for key, value in ext.items():
            if key.endswith("_sensitivity") or key.startswith("non_"):
                lines.append(f"external {key.replace('_', ' ')}: {_pct(value)}")
    if ext and ext.get("ood"):
        lines.append(f"bedside out-of-distribution: {ext['ood']['text']}")
    return lines


def shortcut_section(metrics: Mapping[str, Any]) -> str:
    """Per-source accuracy, confusion matrices, positive calls, the probe; external scores."""
    audit = metrics.get("shortcut") or {}
    ext = metrics.get("external") or {}
    if not audit and not ext:
        return section("shortcut", "Shortcut audit", muted("Not computed for these metrics."))
    positive = audit.get("positive")
    body = ""
    per_src = audit.get("per_source") or {}
    if per_src:
        rows: list[tuple[Any, ...]] = []
        for source, s in per_src.items():
            called = s.get(f"non_{positive}_called_{positive}") if positive else None
            rows.append((source, s["n"], s["accuracy"], fmt_ci(s.get("accuracy_ci95")),
                         _pct(called) if positive else "–"))  # fmt: skip
        head = ("source", "images", "accuracy", "95% CI (Wilson)",
                f"non-{positive} called {positive}" if positive else "–")  # fmt: skip
        body += "<h3>Per source</h3>" + table(head, rows)
        for source, s in per_src.items():
            cm = s["confusion_matrix"]
            cm_rows = [
                (f"true {r}", *counts, s["per_class"][r]["accuracy"])
                for r, counts in zip(cm["rows"], cm["counts"], strict=True)
            ]
            body += f"<h4>{esc(source)}: confusion matrix</h4>" + table(
                ("", *(f"called {c}" for c in cm["columns"]), "accuracy"), cm_rows
            )
    if audit.get("probe"):
        body += f"<h3>Source probe</h3><p>{esc(probe_sentence(audit['probe']))}</p>"
    if ext.get("accuracy"):
        rows = [("accuracy under the label mapping", _pct(ext["accuracy"]))]
        for key, value in ext.items():
            if key.endswith("_sensitivity") or key.startswith("non_"):
                rows.append((key.replace("_", " "), _pct(value)))
        rows += [
            (f"{label} (→ {'|'.join(v['maps_to'])})",
             f"{_pct(v)}; called " + ", ".join(f"{k} {n}" for k, n in sorted(v["called"].items())))
            for label, v in ext["per_label"].items()
        ]  # fmt: skip
        body += "<h3>External labels</h3>" + table(("measure", "value"), rows, cls="kv")
    if ext.get("ood"):
        body += f"<p>Bedside out-of-distribution tests: {esc(ext['ood']['text'])}.</p>"
    return section("shortcut", "Shortcut audit", body + muted(
        "Source from the manifests' source_dataset column. A model that reads disease calls "
        "non-COVID films COVID19 equally rarely in every source; a probe that reads the source "
        "better than the label means the features encode where the film came from."
    ))  # fmt: skip
