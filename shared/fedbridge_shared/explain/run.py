"""``fedbridge explain``: maps for a list of images, written atomically into one output folder.

Layout of ``OUT``::

    explain.json          run record: bundle, methods, per-image rows, class summaries, sanity
    explanations.csv      one row per image and method: prediction, target, region fractions
    class_summary.csv     mean region fractions per method and predicted / true class
    sanity.json           with --sanity: the randomisation check
    index.html            every image's prediction and maps on one page, for a person
    <method>/<name>.png   image + overlay;  <method>/<name>.npy: the raw float32 map (H, W)

Every image is decoded before anything is written, and the folder is built beside ``OUT`` and
renamed into place, so a bad input leaves no partial output.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedbridge_shared.data.images import IMAGE_SUFFIXES
from fedbridge_shared.data.pixels import intensity
from fedbridge_shared.data.tensors import load_resized
from fedbridge_shared.errors import ConfigError, DataError
from fedbridge_shared.explain.index_page import INDEX_FILE, render_index
from fedbridge_shared.explain.methods import (
    METHODS,
    attribute,
    images_to_batch,
    load_explainer,
    predict_probs,
)
from fedbridge_shared.explain.overlay import overlay_png
from fedbridge_shared.explain.regions import REGIONS, region_fractions, summarise
from fedbridge_shared.explain.sanity import SANITY_THRESHOLD, sanity_check, sanity_steps
from fedbridge_shared.files import atomic_dir
from fedbridge_shared.spec import Bundle, load_bundle

RECORD_FILE = "explain.json"
CSV_FIELDS = (
    "file",
    "name",
    "method",
    "true_label",
    "predicted",
    "probability",
    "target",
    "target_probability",
    *REGIONS,
    "border_area",
    "overlay",
    "map",
)


@dataclass(frozen=True)
class ExplainInput:
    """One image to explain; ``true_label`` is its folder name when that is a model label."""

    path: Path
    true_label: str | None


def collect_images(inputs: Sequence[Path], labels: Sequence[str]) -> list[ExplainInput]:
    """Expand files and folders (recursively: PNG, JPEG, DICOM) into a de-duplicated list."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(
                p
                for p in item.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
            if not files:
                raise DataError(f"{item}: no PNG, JPEG or DICOM images in this folder")
            found.extend(files)
        elif item.is_file():
            found.append(item)  # any suffix: read_image recognises DICOM by its header
        else:
            raise DataError(f"{item}: no such file or folder")
    seen: set[Path] = set()
    out = []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            parent = path.parent.name
            out.append(ExplainInput(path, parent if parent in labels else None))
    return out


def resolve_target(target: str | None, labels: Sequence[str]) -> int | None:
    """Index of ``target`` in the bundle's labels; ``None`` means each image's prediction."""
    if target is None:
        return None
    if target not in labels:
        raise ConfigError(
            f"--target {target!r} is not a class of this model; its classes are {', '.join(labels)}"
        )
    return list(labels).index(target)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems, with ``-2``, ``-3``… appended where two inputs share a stem."""
    used: dict[str, int] = {}
    names = []
    for path in paths:
        stem = path.stem or "image"
        n = used.get(stem, 0) + 1
        used[stem] = n
        names.append(stem if n == 1 else f"{stem}-{n}")
    return names


def _check_out(out: Path, *, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD_FILE).is_file():
        raise ConfigError(
            f"{out}: exists and is not a fedbridge explain folder; choose another --out"
        )
    if (out / RECORD_FILE).is_file() and not force:
        raise ConfigError(f"{out}: holds an earlier explain run; add --force to replace it")


def _write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})


def explain_images(
    bundle_path: Path,
    inputs: Sequence[Path],
    out: Path,
    methods: Sequence[str] = ("saliency",),
    target: str | None = None,
    sanity: bool = False,
    sanity_images: int = 8,
    device: str = "auto",
    batch_size: int = 8,
    seed: int = 0,
    force: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Explain every image of ``inputs`` with each of ``methods``; returns the run record.

    An earlier run at ``out`` is replaced only with ``force``."""
    from fedbridge_shared.training import resolve_device

    console = console or Console(stderr=True)
    started = time.perf_counter()
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"unknown method {bad[:1]}; choose from {', '.join(METHODS)}")
    out = Path(out)
    _check_out(out, force=force)
    with console.status("loading the model"):
        bundle = load_bundle(bundle_path)
    labels = list(bundle.spec.labels)
    target_index = resolve_target(target, labels)
    items = collect_images(inputs, labels)
    dev = resolve_device(device)
    size = bundle.spec.image_size

    with _progress(console) as bar:
        task = bar.add_task("reading images", total=len(items))
        images = []
        for item in items:
            # the model's inputs are the intensity-normalised pixels (CLAHE when the spec says)
            img = load_resized(item.path, size)  # DataError names the file
            images.append(intensity(img, bundle.spec.intensity))
            bar.advance(task)

    with console.status(f"preparing the model on {dev}"):
        model = load_explainer(bundle, dev)
    names = _unique_names([i.path for i in items])
    rows: list[dict[str, Any]] = []
    with atomic_dir(out, replace=True) as tmp:
        for method in methods:
            (tmp / method).mkdir()
        with _progress(console) as bar:
            task = bar.add_task(f"explaining ({', '.join(methods)})", total=len(items))
            for start in range(0, len(items), batch_size):
                chunk = range(start, min(start + batch_size, len(items)))
                x = images_to_batch([images[i] for i in chunk], dev)
                probs = predict_probs(model, x)
                pred = probs.argmax(dim=1)
                tgt = pred if target_index is None else torch.full_like(pred, target_index)
                maps = {m: attribute(m, model, x, tgt, seed=seed) for m in methods}
                for j, i in enumerate(chunk):
                    own = {m: batch[j] for m, batch in maps.items()}
                    base = _prediction(items[i], names[i], labels, probs[j], int(tgt[j]))
                    rows.extend(_write_image(tmp, base, items[i], images[i], own))
                    bar.advance(task)
        record = _record(bundle, items, rows, methods, target, labels)
        if sanity:
            k = min(max(1, sanity_images), len(images))
            with _progress(console) as bar:
                task = bar.add_task(
                    f"sanity check on {k} image(s), randomised model", total=sanity_steps(methods)
                )
                record["sanity"] = sanity_check(
                    bundle, images[:k], methods, dev, seed, on_step=lambda: bar.advance(task)
                )
            record["sanity"]["images"] = [str(i.path) for i in items[:k]]
            (tmp / "sanity.json").write_text(json.dumps(record["sanity"], indent=2) + "\n")
        record["seconds"] = round(time.perf_counter() - started, 2)
        _write_csv(tmp / "explanations.csv", CSV_FIELDS, rows)
        _write_class_summary(tmp / "class_summary.csv", record["class_summary"])
        (tmp / INDEX_FILE).write_text(render_index(record), encoding="utf-8")
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _prediction(
    item: ExplainInput, name: str, labels: Sequence[str], probs: torch.Tensor, target: int
) -> dict[str, Any]:
    """The prediction fields of one image's rows."""
    p = probs.detach().cpu().numpy().astype(float)
    predicted = int(p.argmax())
    return {
        "file": str(item.path),
        "name": name,
        "true_label": item.true_label,
        "predicted": labels[predicted],
        "probability": round(float(p[predicted]), 6),
        "target": labels[target],
        "target_probability": round(float(p[target]), 6),
        "probabilities": {label: round(float(v), 6) for label, v in zip(labels, p, strict=True)},
    }


def _write_image(
    tmp: Path,
    base: dict[str, Any],
    item: ExplainInput,
    image: np.ndarray,
    maps: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Write one image's overlay and raw map per method; return its rows."""
    name = base["name"]
    rows = []
    for method, amap in maps.items():
        title = f"{item.path.name}: predicted {base['predicted']} ({base['probability']:.2f})"
        if base["target"] != base["predicted"]:
            title += f", explaining {base['target']}"
        if item.true_label:
            title += f", true {item.true_label}"
        (tmp / method / f"{name}.png").write_bytes(overlay_png(image, amap, method, title))
        buf = io.BytesIO()
        np.save(buf, amap.astype(np.float32))
        (tmp / method / f"{name}.npy").write_bytes(buf.getvalue())
        rows.append(
            {
                **base,
                "method": method,
                **region_fractions(amap),
                "overlay": f"{method}/{name}.png",
                "map": f"{method}/{name}.npy",
            }
        )
    return rows


def _record(
    bundle: Bundle,
    items: Sequence[ExplainInput],
    rows: Sequence[dict[str, Any]],
    methods: Sequence[str],
    target: str | None,
    labels: Sequence[str],
) -> dict[str, Any]:
    class_summary = {
        m: {
            "predicted": summarise([r for r in rows if r["method"] == m], "predicted"),
            "true": summarise([r for r in rows if r["method"] == m], "true_label"),
        }
        for m in methods
    }
    return {
        "bundle": {"path": str(Path(bundle.path).resolve()), "sha256": bundle.sha256},
        "labels": labels,
        "image_size": bundle.spec.image_size,
        "methods": list(methods),
        "target": target or "predicted class",
        "n_images": len(items),
        "rows": rows,
        "class_summary": class_summary,
    }


def _write_class_summary(path: Path, summary: dict[str, Any]) -> None:
    fields = ("method", "group", "class", "n", *REGIONS, "border_area")
    rows = [
        {"method": m, "group": group, "class": cls, **values}
        for m, groups in summary.items()
        for group, classes in groups.items()
        for cls, values in classes.items()
    ]
    _write_csv(path, fields, rows)


def sanity_table(sanity: dict[str, Any]) -> Table:
    """The sanity check as a rich table: mean |rho| per method and the verdict."""
    table = Table(
        title="Sanity check: trained vs randomised weights",
        caption=(
            f"{sanity['n_images']} images; {sanity['randomisation']}; Spearman rho of |map|; "
            f"fails if mean |rho| > {sanity.get('threshold', SANITY_THRESHOLD)}"
        ),
    )
    table.add_column("method")
    table.add_column("mean |rho|", justify="right")
    table.add_column("verdict")
    for method, res in sanity["methods"].items():
        value = res["mean_abs_rho"]
        verdict = "[red]fails sanity check[/]" if res["fails"] else "[green]passes[/]"
        if value is None:
            verdict = "[yellow]undefined (constant maps)[/]"
        table.add_row(method, "–" if value is None else f"{value:.3f}", verdict)
    return table


def region_table(record: dict[str, Any], group: str = "predicted") -> Table:
    """Mean region fractions per method and class (``group``: predicted or true)."""
    table = Table(title=f"Where the model looks (share of |map|, by {group} class)")
    for col in ("method", "class", "n", "left", "right", "centre", "border"):
        table.add_column(col, justify="left" if col in ("method", "class") else "right")
    for method, groups in record["class_summary"].items():
        for cls, v in groups.get(group, {}).items():
            cells = ["–" if v[r] is None else f"{v[r]:.2f}" for r in REGIONS]
            table.add_row(method, cls, str(v["n"]), *cells)
    area = next(
        (v["border_area"] for g in record["class_summary"].values() for v in g[group].values()),
        None,
    )
    if area is not None:
        table.caption = f"a uniform map puts {area:.2f} in the border band"
    return table
