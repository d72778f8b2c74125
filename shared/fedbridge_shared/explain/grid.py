"""The report's saliency grid: per true class, the most confident correct and wrong predictions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedbridge_shared.data.pixels import intensity
from fedbridge_shared.data.tensors import load_resized
from fedbridge_shared.explain.methods import attribute, images_to_batch, load_explainer
from fedbridge_shared.explain.overlay import thumbnail_png
from fedbridge_shared.explain.regions import region_fractions
from fedbridge_shared.spec import Bundle, load_bundle


@dataclass(frozen=True)
class SaliencyExample:
    """One test image with its map over it (PNG bytes), explaining the predicted class."""

    path: str
    true_label: str
    predicted: str
    probability: float
    correct: bool
    method: str
    png: bytes = field(repr=False)
    regions: dict[str, Any] = field(default_factory=dict)


def pick_examples(y_true: Any, probs: Any, per_class: int) -> list[int]:
    """Indices: per true class, the ``per_class`` most confident correct then wrong predictions."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    pred, conf = p.argmax(axis=1), p.max(axis=1)
    chosen: list[int] = []
    for c in range(p.shape[1]):
        for correct in (True, False):
            idx = np.flatnonzero((y == c) & ((pred == c) == correct))
            order = idx[np.argsort(-conf[idx], kind="stable")]
            chosen.extend(int(i) for i in order[:per_class])
    return chosen


def saliency_examples(
    bundle: Bundle | Path | str,
    samples: Sequence[Any],
    y_true: Any,
    probs: Any,
    method: str = "saliency",
    per_class: int = 2,
    device: Any = "cpu",
    seed: int = 0,
    images: Sequence[np.ndarray] | None = None,
    model: Any = None,
) -> list[SaliencyExample]:
    """Maps for the saliency grid of the HTML report.

    ``samples`` are the evaluated images in the order of ``y_true``/``probs`` (``Sample``
    objects with a ``.path``, or paths), as :class:`fedbridge_shared.assessment.Assessment`
    holds them. ``images``: their decoded, resized greyscale images (one per sample; the
    chosen ones are reused, not read again); ``model``: the bundle's model, already built.
    Each example explains its predicted class.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(Path(bundle))
    p = np.asarray(probs, dtype=np.float64)
    if len(samples) != p.shape[0]:
        raise ValueError(f"{len(samples)} samples but {p.shape[0]} rows of probabilities")
    if images is not None and len(images) != len(samples):
        raise ValueError(f"{len(images)} images for {len(samples)} samples")
    labels = bundle.spec.labels
    chosen = pick_examples(y_true, p, per_class)
    if not chosen:
        return []
    paths = [Path(getattr(samples[i], "path", samples[i])) for i in chosen]
    size, normalisation = bundle.spec.image_size, bundle.spec.intensity
    decoded = [
        load_resized(path, size) if images is None else images[i]
        for i, path in zip(chosen, paths, strict=True)
    ]
    shown = [intensity(img, normalisation) for img in decoded]
    explainer = load_explainer(bundle, device, model=model)
    y = np.asarray(y_true, dtype=np.int64)
    pred = p.argmax(axis=1)
    examples: list[SaliencyExample] = []
    for start in range(0, len(chosen), 8):
        part = list(range(start, min(start + 8, len(chosen))))
        x = images_to_batch([shown[k] for k in part], device)
        maps = attribute(method, explainer, x, [int(pred[chosen[k]]) for k in part], seed=seed)
        for j, k in enumerate(part):
            i = chosen[k]
            examples.append(
                SaliencyExample(
                    path=str(paths[k]),
                    true_label=labels[y[i]],
                    predicted=labels[pred[i]],
                    probability=float(p[i, pred[i]]),
                    correct=bool(y[i] == pred[i]),
                    method=method,
                    png=thumbnail_png(shown[k], maps[j], method),
                    regions=region_fractions(maps[j]),
                )
            )
    return examples
