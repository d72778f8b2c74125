"""One assessment of a bundle on a test folder, done once and read by everything that reports it.

:func:`assess` loads the bundle once, scans the folder (and reads its manifest) once, decodes
each image once and runs one forward pass that yields both the probabilities and the pooled
penultimate features the shortcut audit probes. The :class:`Assessment` it returns holds the
samples with their predictions; the metrics, the confusion-matrix and ROC figures (rendered
once, :attr:`Assessment.figures`), the saliency grid (from the chosen samples' decoded images)
and the HTML report all read from it. :func:`write_assessment` writes the report folder
atomically. ``fedbridge evaluate``, the demo and ``federate --test-data`` use this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from torch import nn
from torch.utils.data import DataLoader

from fedbridge_shared import defaults
from fedbridge_shared.data.samples import FolderIndex, Sample, scan_folder
from fedbridge_shared.data.sources import sample_sources
from fedbridge_shared.data.tensors import make_loader
from fedbridge_shared.data.validate import validate_index
from fedbridge_shared.engine import BatchHook
from fedbridge_shared.errors import ConfigError, DataError
from fedbridge_shared.files import atomic_dir
from fedbridge_shared.metrics import compute_metrics
from fedbridge_shared.models import model_from_bundle
from fedbridge_shared.shortcut import (
    external_metrics,
    is_identity,
    resolve_label_map,
    shortcut_audit,
)
from fedbridge_shared.spec import Bundle, load_bundle
from fedbridge_shared.training import (
    decode,
    progress,
    resolve_device,
    training_data_overlap,
)
from fedbridge_shared.tta import apply_view, views_for

__all__ = ["Assessment", "Prediction", "assess", "evaluate_bundle", "write_assessment"]


@dataclass(frozen=True)
class Prediction:
    """One test image with what the model said about it."""

    sample: Sample
    probs: np.ndarray  # (K,) softmax probabilities over the model's labels
    predicted: str
    source: str | None  # the public data set it came from, when the manifest says
    scored: bool  # counted in the paper's metrics (its label maps to exactly one model label)


@dataclass
class Assessment:
    """Everything one assessment computed; every report of it reads from here."""

    bundle: Bundle
    data: Path
    index: FolderIndex
    images: list[np.ndarray] = field(repr=False)  # decoded and resized, one per index.samples
    probs_all: np.ndarray = field(repr=False)  # (N, K), one row per index.samples
    sources: list[str | None]
    scored: list[int]  # rows of index.samples behind ``y``/``probs`` and the paper's metrics
    y: np.ndarray
    probs: np.ndarray
    metrics: dict[str, Any]
    model: nn.Module = field(repr=False)
    device: torch.device

    @property
    def predictions(self) -> list[Prediction]:
        """Every image of the folder with its probabilities and predicted label."""
        labels, scored = self.bundle.spec.labels, set(self.scored)
        return [
            Prediction(s, p, labels[int(p.argmax())], src, i in scored)
            for i, (s, p, src) in enumerate(
                zip(self.index.samples, self.probs_all, self.sources, strict=True)
            )
        ]

    @property
    def scored_samples(self) -> list[Sample]:
        """The samples in the order of ``y``/``probs``."""
        return [self.index.samples[i] for i in self.scored]

    @cached_property
    def figures(self) -> dict[str, bytes]:
        """The confusion-matrix and ROC PNGs, rendered on first use and only then."""
        from fedbridge_shared.report import assessment_figures

        return assessment_figures(self.metrics, self.y, self.probs)


def assess(
    bundle_path: Path,
    data: Path,
    *,
    manifest: Path | None = None,
    batch_size: int = 32,
    n_bootstrap: int = defaults.BOOTSTRAP,
    device: str = "auto",
    tta: bool = defaults.TTA,
    label_map: Mapping[str, Sequence[str]] | None = None,
    console: Console | None = None,
    allow: Iterable[str] = (),
) -> Assessment:
    """Predict every image of ``data`` and compute the paper's metrics with bootstrap CIs.

    ``tta`` averages the probabilities over the views of the spec's modality
    (:func:`~fedbridge_shared.tta.views_for`). ``metrics["shortcut"]`` is the shortcut audit
    (:mod:`fedbridge_shared.shortcut`), probed on the pooled features of the same forward pass.
    With ``label_map`` (folder label → model labels that count as correct) a folder whose labels
    are not the model's is scored too: ``metrics["external"]`` covers every image, while the
    paper's metrics (and ``y``/``probs``) cover the images whose label maps to exactly one model
    label (:func:`fedbridge_shared.training.scored_samples`).
    """
    console = console or Console(stderr=True)
    dev = resolve_device(device)
    bundle = load_bundle(bundle_path)
    spec = bundle.spec
    index = scan_folder(Path(data), manifest)
    for text in validate_index(index, allow=allow):
        console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)
    mapping = resolve_label_map(index.labels, spec.labels, label_map, where=Path(data))
    if not index.samples:
        raise DataError(f"{data}: no images to evaluate")
    model = model_from_bundle(bundle).to(dev)
    images = decode(index.samples, spec.image_size, console=console, what="evaluation images")
    first = {label: spec.labels.index(targets[0]) for label, targets in mapping.items()}
    y_all = [first[s.label] for s in index.samples]
    loader = make_loader(images, y_all, spec, batch_size=batch_size)
    views = views_for(spec.modality) if tta else ("identity",)
    with progress(console) as bar:
        task = bar.add_task("predicting", total=len(images), info="")
        probs_all, features = predict_with_features(
            model, loader, dev, views=views, on_batch=lambda n: bar.advance(task, n)
        )
    sources = sample_sources(index.samples, index.manifest, index.manifest_rows)
    true = [s.label for s in index.samples]
    predicted = [spec.labels[k] for k in probs_all.argmax(axis=1)]
    with console.status("shortcut audit: source probe on the pooled features"):
        audit = shortcut_audit(
            true_labels=true, predicted=predicted, sources=sources,
            groups=[s.patient_id for s in index.samples], features=features,
            model_labels=spec.labels, mapping=mapping,
        )  # fmt: skip
    scored = [i for i, s in enumerate(index.samples) if len(mapping[s.label]) == 1]
    external = None
    if not is_identity(mapping):
        external = external_metrics(true, predicted, mapping)
        if not scored:
            raise DataError(
                f"{data}: no class folder maps to exactly one model label; nothing to compute "
                "the per-class metrics on"
            )
    y, probs = np.asarray(y_all, dtype=np.int64)[scored], probs_all[scored]
    with console.status(f"metrics with {n_bootstrap} bootstrap resamples"):
        metrics = compute_metrics(y, probs, spec.labels, n_bootstrap=n_bootstrap)
    metrics["shortcut"] = audit
    if external is not None:
        metrics["external"] = external
    metrics["bundle"] = {"path": str(Path(bundle_path).resolve()), "sha256": bundle.sha256}
    if tta:
        metrics["tta"] = list(views)
    metrics["data"] = {"path": str(Path(data).resolve()), "patient_ids": index.patient_source}
    overlap = training_data_overlap(bundle.training, data)
    if overlap:
        metrics["warnings"] = [overlap]
        console.print(f"[bold red]WARNING:[/] {escape(overlap)}", highlight=False)
    return Assessment(
        bundle=bundle, data=Path(data), index=index, images=images, probs_all=probs_all,
        sources=sources, scored=scored, y=y, probs=probs, metrics=metrics, model=model,
        device=dev,
    )  # fmt: skip


def evaluate_bundle(
    bundle_path: Path, data: Path, **options: Any
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """:func:`assess`'s ``(metrics, y, probs)``, for callers that need only the numbers."""
    result = assess(bundle_path, data, **options)
    return result.metrics, result.y, result.probs


@torch.no_grad()
def predict_with_features(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    *,
    views: Sequence[str] = ("identity",),
    on_batch: BatchHook | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities ``(N, K)`` averaged over ``views`` and the pooled penultimate
    features ``(N, F)`` of the plain image, from one backbone pass per view.

    The features of the ``identity`` view are the pre-logits output of the timm model's
    ``forward_head`` on the same feature map its logits come from (``model(x)`` is
    ``forward_head(forward_features(x))``).
    """
    if not views:
        raise ValueError("at least one view is needed")
    model.eval()
    timm_model: Any = model  # timm's forward_features / forward_head are untyped
    probs, feats = [], []
    for x, _ in loader:
        x = x.to(device)
        fmap = timm_model.forward_features(x)
        feats.append(timm_model.forward_head(fmap, pre_logits=True).flatten(1).double().cpu())
        p = torch.zeros(())
        for view in views:
            logits = (
                timm_model.forward_head(fmap) if view == "identity" else model(apply_view(x, view))
            )
            p = p + torch.softmax(logits, dim=1).double()
        probs.append((p / len(views)).cpu())
        if on_batch:
            on_batch(len(x))
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


def write_assessment(
    result: Assessment,
    out_dir: Path,
    *,
    title: str,
    config: Mapping[str, Any] | None = None,
    counts: Mapping[str, Mapping[str, int]] | None = None,
    test_name: str = "test set",
    warn: Callable[[str], None] | None = None,
) -> list[str]:
    """``metrics.json``, ``confusion_matrix.png``, ``roc.png`` and ``report.html`` in ``out_dir``,
    all at once or not at all (an earlier report there is replaced only on success; files
    fedbridge did not write are kept). Returns the file names written; a disk error is a
    ConfigError naming the folder."""
    from fedbridge_shared.html_report import write_bundle_report
    from fedbridge_shared.report import write_metrics

    figures = result.figures
    scored = result.scored_samples
    try:
        with atomic_dir(Path(out_dir), replace=True) as tmp:
            paths = write_metrics(result.metrics, tmp, result.y, result.probs, figures=figures)
            paths["report"] = write_bundle_report(
                tmp, result.bundle, scored, result.metrics, result.y, result.probs,
                title=title, config=config, counts=counts, test_name=test_name,
                sources=[result.sources[i] for i in result.scored], device=result.device,
                warn=warn, images=[result.images[i] for i in result.scored],
                model=result.model, figures=figures,
            )  # fmt: skip
    except OSError as e:
        raise ConfigError(f"{out_dir}: cannot write the report: {e.strerror or e}") from e
    return [Path(p).name for p in paths.values()]
