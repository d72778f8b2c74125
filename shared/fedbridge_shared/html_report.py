"""One self-contained HTML assessment report: every figure is an embedded base64 PNG.

Sections (each a ``<section id=…>``, in :data:`SECTIONS` order): ``card`` (model card, when
given), ``config``, ``lineage`` (when given), ``counts``, ``metrics`` (headline numbers and
per-class values with CIs), ``calibration`` (reliability diagram, ECE), ``confusion``, ``roc``,
``sites`` and ``cross_site`` (federated runs with per-site numbers), ``rounds`` (per-round or
per-epoch curves), ``saliency`` (correct and wrong predictions per class with their maps and a
colour bar) and ``sanity``. No script, stylesheet or font is fetched; every table scrolls in
its own box and figures shrink, so a 600 px window reads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedbridge_shared import __version__
from fedbridge_shared import rounds as R
from fedbridge_shared.files import atomic_write
from fedbridge_shared.metrics import CI_METRICS, calibration
from fedbridge_shared.report import assessment_figures, plot_history, plot_reliability
from fedbridge_shared.report_sections import (
    card_section,
    cross_site_section,
    esc,
    fmt,
    fmt_ci,
    lineage_section,
    png_img,
    section,
    shortcut_section,
    site_rows,
    sites_section,
    table,
)

REPORT_FILE = "report.html"
SECTIONS = (
    "card", "config", "lineage", "counts", "metrics", "shortcut", "calibration", "confusion",
    "roc",
    "sites", "cross_site", "rounds", "saliency", "sanity",
)  # fmt: skip

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;
max-width:1100px;color:#1b1f24;background:#fff;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem;overflow-wrap:anywhere}h2{border-bottom:2px solid #d0d7de;
padding-bottom:.2rem;margin-top:2rem}.scroll{overflow-x:auto;max-width:100%;margin:.5rem 0}
table{border-collapse:collapse}td,th{border:1px solid #d0d7de;padding:.25rem .6rem;
text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}th{background:#f3f5f7}
td:first-child,th:first-child{text-align:left}table.kv td{text-align:left;overflow-wrap:anywhere;
white-space:normal;min-width:8rem}table.kv th{text-align:left}.muted{color:#57606a;font-size:.9rem}
.grid{display:flex;flex-wrap:wrap;gap:.6rem}.cell{width:180px;font-size:.78rem;overflow-wrap:anywhere}
.cell img{width:176px;height:176px;border:2px solid #2da44e}.cell.wrong img{border-color:#cf222e}
.fail{color:#cf222e;font-weight:600}.pass{color:#1a7f37}pre{background:#f6f8fa;padding:.6rem;
overflow-x:auto;font-size:.8rem}img.fig{max-width:100%;height:auto}img.bar{max-width:420px;
width:100%;height:auto}
@media (max-width:640px){body{margin:.5rem auto;padding:0 .5rem}.cell{width:46%}
.cell img{width:100%;height:auto}td,th{padding:.2rem .35rem}}
"""


def _config_section(config: Mapping[str, Any]) -> str:
    rows = []
    for key, value in config.items():
        shown = json.dumps(value, default=str) if isinstance(value, dict | list) else value
        rows.append((key, shown))
    return section("config", "Configuration", table(("setting", "value"), rows, cls="kv"))


def _counts_section(counts: Mapping[str, Mapping[str, int]], labels: Sequence[str]) -> str:
    extra = sorted({k for c in counts.values() for k in c} - set(labels))  # --label-map sets
    columns = [*labels, *extra]
    header = ("split / site", *labels, *(f"{k} (label set)" for k in extra), "total")
    rows = []
    for part, per_class in counts.items():
        values = [int(per_class.get(label, 0)) for label in columns]
        rows.append((part, *values, sum(values)))
    return section("counts", "Images per split and site", table(header, rows))


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    ci = metrics.get("ci95") or {}
    level = (metrics.get("bootstrap") or {}).get("ci", 0.95)
    names = {
        "accuracy": "Accuracy",
        "macro_auc": "Macro AUC (one-vs-rest)",
        "sensitivity_mean": "Mean sensitivity",
        "f1_mean": "Mean F1",
    }
    sds = {"sensitivity_mean": "sensitivity_sd", "f1_mean": "f1_sd"}
    rows = []
    for key in CI_METRICS:
        sd = metrics.get(sds[key]) if key in sds else None
        rows.append((names.get(key, key), metrics.get(key), sd, fmt_ci(ci.get(key))))
    headline = table(("metric", "value", "SD across classes", f"{level:.0%} CI"), rows)
    per_class = metrics.get("per_class") or {}
    class_ci = metrics.get("per_class_ci95") or {}
    class_rows = []
    for label, v in per_class.items():
        cis = class_ci.get(label) or {}
        class_rows.append(
            (label, v.get("sensitivity"), fmt_ci(cis.get("sensitivity")), v.get("specificity"),
             fmt_ci(cis.get("specificity")), v.get("precision"), v.get("f1"), v.get("auc"),
             v.get("support"))
        )  # fmt: skip
    n_boot = (metrics.get("bootstrap") or {}).get("n_resamples")
    note = f'<p class="muted">n = {esc(metrics.get("n"))} images'
    if n_boot:
        note += (
            f"; percentile bootstrap over images, {n_boot} resamples (the per-class intervals "
            "come from the same resamples)"
        )
    note += "</p>"
    header = ("class", "sensitivity", f"{level:.0%} CI", "specificity", f"{level:.0%} CI",
              "precision", "f1", "auc", "support")  # fmt: skip
    return section(
        "metrics", "Metrics", headline + note + "<h3>Per class</h3>" + table(header, class_rows)
    )


def _calibration_section(cal: Mapping[str, Any]) -> str:
    body = png_img(plot_reliability(cal), "reliability diagram") + (
        f'<p class="muted">Expected calibration error (ECE) {cal["ece"]:.3f} over '
        f"{cal['n_bins']} equal confidence bins: the image-weighted mean gap between how sure "
        "the model is (its highest probability) and how often it is right. 0 is perfectly "
        "calibrated; bars below the diagonal are over-confident.</p>"
    )
    return section("calibration", "Calibration", body)


def _saliency_section(examples: Sequence[Any], labels: Sequence[str]) -> str:
    from fedbridge_shared.explain.methods import SIGNED_METHODS
    from fedbridge_shared.explain.overlay import colourbar_png
    from fedbridge_shared.explain.regions import summarise

    method = examples[0].method
    signed = method in SIGNED_METHODS
    if signed:
        scale = (
            f"<b>{esc(method)}</b> is signed, drawn in blue–white–red (bwr) around 0: red "
            "pixels raise the predicted class's score, blue pixels lower it."
        )
    else:
        scale = (
            f"<b>{esc(method)}</b> is unsigned (how strongly each pixel affects the score, not "
            "in which direction), drawn in inferno: faint and dark for little, through red "
            "to bright yellow for the most."
        )
    parts = [
        '<p class="muted">For each true class, the most confident correct (green frame) and '
        "wrong (red frame) test predictions, with the map of the predicted class over the "
        f"image. {scale} Each map is scaled to its own 99th percentile; faint pixels let the "
        "image show through.</p>",
        png_img(colourbar_png(signed), f"colour scale of the {method} maps", "bar"),
    ]
    for label in labels:
        mine = [ex for ex in examples if ex.true_label == label]
        if not mine:
            continue
        cells = []
        for ex in mine:
            cls = "cell" if ex.correct else "cell wrong"
            caption = (
                f"{'✓' if ex.correct else '✗'} predicted {esc(ex.predicted)} "
                f"({ex.probability:.2f})<br>{esc(Path(ex.path).name)}"
            )
            cells.append(f'<div class="{cls}">{png_img(ex.png, ex.path, "")}<br>{caption}</div>')
        parts.append(f"<h3>true {esc(label)}</h3><div class='grid'>{''.join(cells)}</div>")
    rows = [{**ex.regions, "true_label": ex.true_label} for ex in examples]
    summary = summarise(rows, "true_label")
    table_rows = [
        (cls, v["n"], v["left"], v["right"], v["centre"], v["border"]) for cls, v in summary.items()
    ]
    area = next(iter(summary.values()))["border_area"] if summary else None
    parts.append(
        "<h3>Where the maps put their mass</h3>"
        + table(("true class", "n", "left", "right", "centre", "border"), table_rows)
        + f'<p class="muted">Share of |map| in the image halves and in the border band; a '
        f"uniform map puts {fmt(area, 2)} in the border. Much more mass on one side or in the "
        "border (text markers, collimation, the source hospital's framing) suggests a shortcut."
        "</p>"
    )
    return section("saliency", "Saliency grid", "".join(parts))


def sanity_section(sanity: Mapping[str, Any]) -> str:
    """The model-randomisation check as a table with its verdicts (report and explain index)."""
    rows = []
    for method, res in sanity["methods"].items():
        verdict = "fails sanity check" if res["fails"] else "passes"
        if res["mean_abs_rho"] is None:
            verdict = "undefined (constant maps)"
        rows.append((method, res["mean_abs_rho"], verdict))
    body = table(("method", "mean |Spearman rho|", "verdict"), rows).replace(
        "<td>fails sanity check</td>", '<td class="fail">fails sanity check</td>'
    )
    body += (
        f'<p class="muted">{esc(sanity["n_images"])} images; maps on the trained model vs '
        f"{esc(sanity['randomisation'])}; a method fails when mean |rho| > "
        f"{esc(sanity['threshold'])}: its maps then say little about what the model learnt.</p>"
    )
    return section("sanity", "Sanity check (model-parameter randomisation)", body)


def render_html_report(
    *,
    title: str,
    config: Mapping[str, Any],
    counts: Mapping[str, Mapping[str, int]],
    metrics: Mapping[str, Any],
    y_true: Any,
    probs: Any,
    labels: Sequence[str] | None = None,
    rounds: Sequence[Mapping[str, Any]] | None = None,
    saliency_examples: Sequence[Any] | None = None,
    sanity: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
    lineage: Sequence[Mapping[str, str]] | None = None,
    best_round: int | None = None,
    sources: Sequence[str | None] | None = None,
    test_name: str = "test set",
    figures: Mapping[str, bytes] | None = None,
) -> str:
    """The report as one HTML string (see :func:`write_html_report`)."""
    labels = list(labels if labels is not None else metrics["labels"])
    y = np.asarray(y_true)
    p = np.asarray(probs)
    metrics = dict(metrics)
    metrics.setdefault("calibration", calibration(y, p))
    rounds = list(rounds or [])
    sites = site_rows(rounds)
    if figures is None:
        figures = assessment_figures(metrics, y, p, labels)
    confusion = figures["confusion_matrix"]
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="muted">fedbridge {esc(__version__)} · '
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>",
    ]
    for warning in metrics.get("warnings") or []:
        body.append(
            '<p class="warning" style="border:3px solid #b00;padding:.6em;color:#b00">'
            f"<b>WARNING</b>: {esc(warning)}</p>"
        )
    if card is not None:
        body.append(
            card_section(card=card, metrics=metrics, labels=labels, y_true=y, probs=p,
                         sources=sources, counts=counts, sites=sites)
        )  # fmt: skip
    body.append(_config_section(config))
    if lineage:
        body.append(lineage_section(lineage))
    body += [
        _counts_section(counts, labels),
        _metrics_section(metrics),
        shortcut_section(metrics),
        _calibration_section(metrics["calibration"]),
        section("confusion", "Confusion matrix", png_img(confusion, "confusion matrix")),
        section("roc", "ROC curves (one-vs-rest)", png_img(figures["roc"], "ROC curves")),
    ]
    if sites:
        body.append(sites_section(rounds, labels, best_round))
        body.append(cross_site_section(rounds, best_round, metrics, y, p, test_name))
    if rounds:
        x_key = R.ROUND if any(R.ROUND in r for r in rounds) else "epoch"
        heading = "Federated rounds" if x_key == R.ROUND else "Training curves (per epoch)"
        body.append(section("rounds", heading, png_img(plot_history(rounds), heading)))
    if saliency_examples:
        body.append(_saliency_section(saliency_examples, labels))
    if sanity:
        body.append(sanity_section(sanity))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write_html_report(out_dir: Path, *, filename: str = REPORT_FILE, **parts: Any) -> Path:
    """Write ``out_dir/report.html`` atomically and return its path.

    ``parts`` are :func:`render_html_report`'s keywords:

    - ``title``: the page heading; ``config``: setting → value (nested values shown as JSON).
    - ``counts``: split or site name → {label: image count}.
    - ``metrics``: :func:`fedbridge_shared.metrics.compute_metrics` of ``y_true``/``probs``;
      ``labels``: class names in index order (default ``metrics["labels"]``).
    - ``rounds``: ``training["history"]`` of a bundle: per-round rows of a federated run (keys
      ``round``, ``*_loss``, ``*_accuracy``, ``per_site``) or per-epoch rows (``epoch``);
      ``best_round``: the round kept as the final model (for the site tables).
    - ``saliency_examples``: from :func:`fedbridge_shared.explain.grid.saliency_examples`;
      ``sanity``: from :func:`fedbridge_shared.explain.sanity.sanity_check`.
    - ``card``: model-card facts (``arch``, ``image_size``, ``stage``, ``privacy``, ``synthetic``,
      ``label_map``); ``lineage``: :func:`report_sections.lineage_steps`; ``sources``: each
      test image's source data set (``None`` unknown), for per-source accuracy;
      ``test_name``: the test set's row name in the cross-site table.
    - ``figures``: the confusion-matrix and ROC PNGs of
      :func:`fedbridge_shared.report.assessment_figures` when already rendered.
    """
    payload = render_html_report(**parts).encode("utf-8")
    return atomic_write(Path(out_dir) / filename, lambda fh: fh.write(payload))


def privacy_line(privacy: Mapping[str, Any]) -> str:
    """The privacy a federated model was trained under, in one sentence."""
    if privacy.get("level") == "record":
        sites = ", ".join(
            f"{name} ε = {eps:.2f} (σ {privacy['noise_multiplier_per_site'][name]:.3g}, "
            f"{privacy['patients_per_site'][name]} patients)"
            for name, eps in privacy["epsilon_per_site"].items()
        )
        return (
            f"record-level DP-SGD at every site, one patient per record (δ = "
            f"{privacy['delta']:g}, per-patient gradient clip {privacy['max_grad_norm']:g}) "
            f"over {privacy['rounds']} round(s): {sites}; {privacy['accountant']}"
        )
    return (
        f"(ε = {privacy['epsilon']:.2f}, δ = {privacy['delta']:g}) over {privacy['rounds']} "
        f"round(s), site-level: each site's update clipped to L2 norm "
        f"{privacy['clipping_norm']:g}, Gaussian noise multiplier "
        f"{privacy['noise_multiplier']:.3g}, "
        f"sampling rate {privacy['sample_rate']:.3g}; {privacy['accountant']}"
    )


def bundle_context(
    bundle: Any,
) -> tuple[dict[str, Any], dict[str, Mapping[str, int]], list[dict[str, Any]]]:
    """``(config, counts, rounds)`` for the report from a loaded bundle's record.

    Counts are the stage's own (central) or each site's train and validation images per class
    (federated, from the rounds' ``per_site``).
    """
    spec, training = bundle.spec, bundle.training
    init = spec.init or {}
    config: dict[str, Any] = {
        "bundle": str(bundle.path),
        "weights sha256": bundle.sha256,
        "model": f"{spec.arch} @ {spec.image_size} px",
        "labels": list(spec.labels),
        "init": f"{init.get('kind')} {init.get('source', '')}".strip() + " (see Lineage)",
        "stage": training.get("stage"),
    }
    if training.get("privacy"):
        config["differential privacy"] = privacy_line(training["privacy"])
    if training.get("config"):
        config["training config"] = training["config"]
    counts: dict[str, Mapping[str, int]] = {
        f"training: {k}": dict(v) for k, v in (training.get("counts") or {}).items()
    }
    rounds = list(training.get("history") or [])
    for name, s in site_rows(rounds).items():
        counts[f"{name}: train"] = dict(s.get("train_counts") or {})
        counts[f"{name}: validation"] = dict(s.get("val_counts") or {})
    return config, counts, rounds


def bundle_card(bundle: Any) -> dict[str, Any]:
    """The model-card facts of a loaded bundle (see :func:`write_html_report`'s ``card``)."""
    spec, training = bundle.spec, bundle.training
    return {
        "arch": spec.arch,
        "image_size": spec.image_size,
        "stage": training.get("stage"),
        "privacy": training.get("privacy"),
        "label_map": (spec.init or {}).get("label_map"),
    }


def write_bundle_report(
    out_dir: Path,
    bundle: Any,
    test_samples: Sequence[Any],
    metrics: Mapping[str, Any],
    y_true: Any,
    probs: Any,
    *,
    title: str,
    config: Mapping[str, Any] | None = None,
    counts: Mapping[str, Mapping[str, int]] | None = None,
    sources: Sequence[str | None] | None = None,
    test_name: str = "test set",
    device: Any = "cpu",
    warn: Any = None,
    images: Sequence[Any] | None = None,
    model: Any = None,
    figures: Mapping[str, bytes] | None = None,
) -> Path:
    """report.html for ``bundle`` (a folder or a loaded ``Bundle``) assessed on
    ``test_samples`` (in the order of ``y_true``).

    The bundle's record gives config, lineage, training and site counts and curves; ``config``
    and ``counts`` add to them; ``sources`` (one per test sample, e.g. from
    :func:`fedbridge_shared.data.sources.sample_sources`) add per-source accuracy to the model
    card. ``images`` (the decoded test images, one per sample), ``model`` (the bundle's model)
    and ``figures`` (:func:`fedbridge_shared.report.assessment_figures`) are reused when given,
    not decoded, built or rendered again. Without captum the report is written without its
    saliency grid (``warn`` is told).
    """
    from fedbridge_shared.errors import ConfigError
    from fedbridge_shared.explain.grid import saliency_examples
    from fedbridge_shared.report_sections import lineage_steps
    from fedbridge_shared.spec import Bundle, load_bundle

    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    base_config, base_counts, rounds = bundle_context(loaded)
    base_config.update(config or {})
    base_counts.update(counts or {})
    try:
        examples = saliency_examples(
            loaded, test_samples, y_true, probs, device=device, images=images, model=model
        )
    except ConfigError as e:  # captum missing
        if warn is not None:
            warn(f"report without saliency grid: {e}")
        examples = None
    return write_html_report(
        out_dir,
        title=title,
        config=base_config,
        counts=base_counts,
        metrics=metrics,
        y_true=y_true,
        probs=probs,
        rounds=rounds,
        saliency_examples=examples,
        card={**bundle_card(loaded), "synthetic": bool((config or {}).get("synthetic"))},
        lineage=lineage_steps(loaded.spec, loaded.training, loaded.sha256),
        best_round=loaded.training.get("best_round"),
        sources=sources,
        test_name=test_name,
        figures=figures,
    )
