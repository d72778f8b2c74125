"""One self-contained HTML assessment report: every figure is an embedded base64 PNG.

Sections (each a ``<section id=…>``): ``config``, ``counts``, ``metrics`` (headline numbers with
CIs and per-class values), ``confusion``, ``roc``, ``rounds`` (per-round or per-epoch curves,
when given), ``saliency`` (grid of correct and wrong predictions per class, with where the maps
put their mass) and ``sanity`` (when given). No script, stylesheet or font is fetched.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fedbridge_shared import __version__
from fedbridge_shared.files import atomic_write
from fedbridge_shared.metrics import CI_METRICS
from fedbridge_shared.report import plot_confusion_matrix, plot_roc

REPORT_FILE = "report.html"
SECTIONS = ("config", "counts", "metrics", "confusion", "roc", "rounds", "saliency", "sanity")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1b1f24;background:#fff;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2rem;
margin-top:2rem}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #d0d7de;
padding:.25rem .6rem;text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f5f7}
td:first-child,th:first-child{text-align:left}.muted{color:#57606a;font-size:.9rem}
.grid{display:flex;flex-wrap:wrap;gap:.6rem}.cell{width:180px;font-size:.78rem;overflow-wrap:anywhere}
.cell img{width:176px;height:176px;border:2px solid #2da44e}.cell.wrong img{border-color:#cf222e}
.fail{color:#cf222e;font-weight:600}.pass{color:#1a7f37}pre{background:#f6f8fa;padding:.6rem;
overflow-x:auto;font-size:.8rem}img.fig{max-width:100%}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def png_img(png: bytes, alt: str, cls: str = "fig") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}"><h2>{_e(title)}</h2>{body}</section>'


def _config_section(config: Mapping[str, Any]) -> str:
    rows = []
    for key, value in config.items():
        shown = json.dumps(value, default=str) if isinstance(value, dict | list) else value
        rows.append((key, shown))
    return _section("config", "Configuration", _table(("setting", "value"), rows))


def _counts_section(counts: Mapping[str, Mapping[str, int]], labels: Sequence[str]) -> str:
    header = ("split / site", *labels, "total")
    rows = []
    for part, per_class in counts.items():
        values = [int(per_class.get(label, 0)) for label in labels]
        rows.append((part, *values, sum(values)))
    return _section("counts", "Images per split and site", _table(header, rows))


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
        interval = ci.get(key)
        shown = "–" if not interval else f"{interval[0]:.3f} – {interval[1]:.3f}"
        sd = metrics.get(sds[key]) if key in sds else None
        rows.append((names.get(key, key), metrics.get(key), sd, shown))
    headline = _table(("metric", "value", "SD across classes", f"{level:.0%} CI"), rows)
    per_class = metrics.get("per_class") or {}
    cols = ("sensitivity", "specificity", "precision", "f1", "auc", "support")
    class_rows = [(label, *(v.get(c) for c in cols)) for label, v in per_class.items()]
    n_boot = (metrics.get("bootstrap") or {}).get("n_resamples")
    note = f'<p class="muted">n = {_e(metrics.get("n"))} images'
    if n_boot:
        note += f"; percentile bootstrap over images, {n_boot} resamples"
    note += "</p>"
    return _section(
        "metrics",
        "Metrics",
        headline + note + "<h3>Per class</h3>" + _table(("class", *cols), class_rows),
    )


def _temp_png(plot) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "figure.png"
        plot(path)
        return path.read_bytes()


def plot_history(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Loss and accuracy curves against ``round`` (federated) or ``epoch`` (central)."""
    x_key = "round" if any("round" in r for r in rows) else "epoch"
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, int | float)})
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, suffix in zip(axes, ("loss", "accuracy"), strict=True):
        for key in (k for k in keys if k.endswith(suffix)):
            pts = [(r[x_key], r[key]) for r in rows if r.get(key) is not None and x_key in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=key.replace("_", " "))
        ax.set_xlabel(x_key)
        ax.set_ylabel(suffix)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    from fedbridge_shared.explain.overlay import figure_png

    return figure_png(fig)


def _saliency_section(examples: Sequence[Any], labels: Sequence[str]) -> str:
    from fedbridge_shared.explain.regions import summarise

    method = examples[0].method
    parts = [
        '<p class="muted">For each true class, the most confident correct (green frame) and '
        f"wrong (red frame) test predictions, with the <b>{_e(method)}</b> map of the predicted "
        "class over the image. Red/blue maps: red pushes the prediction up, blue down.</p>"
    ]
    for label in labels:
        mine = [ex for ex in examples if ex.true_label == label]
        if not mine:
            continue
        cells = []
        for ex in mine:
            cls = "cell" if ex.correct else "cell wrong"
            caption = (
                f"{'✓' if ex.correct else '✗'} predicted {_e(ex.predicted)} "
                f"({ex.probability:.2f})<br>{_e(Path(ex.path).name)}"
            )
            cells.append(f'<div class="{cls}">{png_img(ex.png, ex.path, "")}<br>{caption}</div>')
        parts.append(f"<h3>true {_e(label)}</h3><div class='grid'>{''.join(cells)}</div>")
    rows = [{**ex.regions, "true_label": ex.true_label} for ex in examples]
    summary = summarise(rows, "true_label")
    table_rows = [
        (cls, v["n"], v["left"], v["right"], v["centre"], v["border"]) for cls, v in summary.items()
    ]
    area = next(iter(summary.values()))["border_area"] if summary else None
    parts.append(
        "<h3>Where the maps put their mass</h3>"
        + _table(("true class", "n", "left", "right", "centre", "border"), table_rows)
        + f'<p class="muted">Share of |map| in the image halves and in the border band; a '
        f"uniform map puts {_fmt(area, 2)} in the border. Much more mass on one side or in the "
        "border (text markers, collimation, the source hospital's framing) suggests a shortcut."
        "</p>"
    )
    return _section("saliency", "Saliency grid", "".join(parts))


def _sanity_section(sanity: Mapping[str, Any]) -> str:
    rows = []
    for method, res in sanity["methods"].items():
        verdict = "fails sanity check" if res["fails"] else "passes"
        rows.append((method, res["mean_abs_rho"], verdict))
    body = _table(("method", "mean |Spearman rho|", "verdict"), rows).replace(
        "<td>fails sanity check</td>", '<td class="fail">fails sanity check</td>'
    )
    body += (
        f'<p class="muted">{_e(sanity["n_images"])} images; maps on the trained model vs '
        f"{_e(sanity['randomisation'])}; a method fails when mean |rho| > "
        f"{_e(sanity['threshold'])}.</p>"
    )
    return _section("sanity", "Sanity check (model-parameter randomisation)", body)


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
) -> str:
    """The report as one HTML string (see :func:`write_html_report`)."""
    labels = list(labels if labels is not None else metrics["labels"])
    y = np.asarray(y_true)
    p = np.asarray(probs)
    confusion = _temp_png(lambda path: plot_confusion_matrix(dict(metrics), path))
    roc = _temp_png(lambda path: plot_roc(y, p, labels, path))
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">fedbridge {_e(__version__)} · '
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>",
        _config_section(config),
        _counts_section(counts, labels),
        _metrics_section(metrics),
        _section("confusion", "Confusion matrix", png_img(confusion, "confusion matrix")),
        _section("roc", "ROC curves (one-vs-rest)", png_img(roc, "ROC curves")),
    ]
    if rounds:
        x_key = "round" if any("round" in r for r in rounds) else "epoch"
        heading = "Federated rounds" if x_key == "round" else "Training curves (per epoch)"
        body.append(_section("rounds", heading, png_img(plot_history(rounds), heading)))
    if saliency_examples:
        body.append(_saliency_section(saliency_examples, labels))
    if sanity:
        body.append(_sanity_section(sanity))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write_html_report(
    out_dir: Path,
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
    filename: str = REPORT_FILE,
) -> Path:
    """Write ``out_dir/report.html`` atomically and return its path.

    Args:
        title: the page heading.
        config: setting → value (nested dicts/lists are shown as JSON).
        counts: split or site name → {label: image count}, e.g.
            ``{"bridge": {...}, "site-1": {...}, "test": {...}}``.
        metrics: :func:`fedbridge_shared.metrics.compute_metrics` of ``y_true``/``probs``.
        labels: class names in index order (default ``metrics["labels"]``).
        rounds: per-round rows of a federated run (``training["history"]`` of its bundle, keys
            ``round``, ``*_loss``, ``*_accuracy``) or per-epoch rows (key ``epoch``); optional.
        saliency_examples: from :func:`fedbridge_shared.explain.grid.saliency_examples`.
        sanity: from :func:`fedbridge_shared.explain.sanity.sanity_check`; optional.
    """
    text = render_html_report(
        title=title,
        config=config,
        counts=counts,
        metrics=metrics,
        y_true=y_true,
        probs=probs,
        labels=labels,
        rounds=rounds,
        saliency_examples=saliency_examples,
        sanity=sanity,
    )
    payload = text.encode("utf-8")
    return atomic_write(Path(out_dir) / filename, lambda fh: fh.write(payload))


def privacy_line(privacy: Mapping[str, Any]) -> str:
    """The privacy a federated model was trained under, in one sentence."""
    return (
        f"(ε = {privacy['epsilon']:.2f}, δ = {privacy['delta']:g}) over {privacy['rounds']} "
        f"round(s), site-level: each site's update clipped to L2 norm "
        f"{privacy['clipping_norm']:g}, Gaussian noise multiplier "
        f"{privacy['noise_multiplier']:.3g}, "
        f"sampling rate {privacy['sample_rate']:.3g}; {privacy['accountant']}"
    )


def bundle_context(bundle: Any) -> tuple[dict[str, Any], dict[str, dict[str, int]], list[dict]]:
    """``(config, counts, rounds)`` for the report from a loaded bundle's record."""
    spec, training = bundle.spec, bundle.training
    config: dict[str, Any] = {
        "bundle": str(bundle.path),
        "weights sha256": bundle.sha256,
        "model": f"{spec.arch} @ {spec.image_size} px",
        "labels": list(spec.labels),
        "init": spec.init.get("kind"),
        "stage": training.get("stage"),
    }
    if training.get("privacy"):
        config["differential privacy"] = privacy_line(training["privacy"])
    if training.get("config"):
        config["training config"] = training["config"]
    counts = {f"training: {k}": dict(v) for k, v in (training.get("counts") or {}).items()}
    rounds = list(training.get("history") or [])
    return config, counts, rounds


def write_bundle_report(
    out_dir: Path,
    bundle: Path,
    test_samples: Sequence[Any],
    metrics: Mapping[str, Any],
    y_true: Any,
    probs: Any,
    *,
    title: str,
    config: Mapping[str, Any] | None = None,
    counts: Mapping[str, Mapping[str, int]] | None = None,
    device: str = "cpu",
    warn: Any = None,
) -> Path:
    """report.html for ``bundle`` assessed on ``test_samples`` (in the order of ``y_true``).

    The bundle's record gives config, training counts and curves; ``config`` and ``counts`` add
    to them. Without captum the report is written without its saliency grid (``warn`` is told).
    """
    from fedbridge_shared.errors import ConfigError
    from fedbridge_shared.explain.grid import saliency_examples
    from fedbridge_shared.spec import load_bundle

    loaded = load_bundle(bundle)
    base_config, base_counts, rounds = bundle_context(loaded)
    base_config.update(config or {})
    base_counts.update(counts or {})
    try:
        examples = saliency_examples(loaded, test_samples, y_true, probs, device=device)
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
    )
