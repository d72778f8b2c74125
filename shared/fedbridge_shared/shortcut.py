"""Shortcut audit: does a model read the image's *source* more easily than its *disease*?

Three parts, all numbers, no pictures (``report_sections.shortcut_section`` renders them):

- :func:`per_source`: accuracy and the confusion matrix of each source data set (from the
  manifests' ``source_dataset``), per true class, and the rate at which the films of each source
  that are *not* the positive class (COVID19) are called positive.
- :func:`source_probe`: a cross-validated linear classifier (scikit-learn ``LogisticRegression``,
  patient-grouped folds) on the model's penultimate pooled features, predicting the source and,
  beside it, the label; balanced accuracy both, and chance-adjusted (0 = chance, 1 = perfect).
  ``flagged`` when the source is easier to read than the disease.
- :func:`external_metrics` with a declared :func:`parse_label_map`: scoring a folder whose labels
  are not the model's (``PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA``: a
  prediction of either counts as correct).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedbridge_shared.errors import ConfigError
from fedbridge_shared.metrics import wilson_interval

POSITIVE = "COVID19"
"""The class a false call of which sends a patient down the wrong pathway."""
UNKNOWN_SOURCE = "unknown"
PROBE_FOLDS = 5
FLAG_TEXT = "this model reads the image's source more easily than its disease"

LabelMap = dict[str, tuple[str, ...]]


# --------------------------------------------------------------------------------------------
# label mapping


def parse_label_map(items: Sequence[str], *, option: str = "--label-map") -> LabelMap:
    """``["EXT=A|B", …]`` → ``{"EXT": ("A", "B")}``; bad syntax is a one-line ConfigError."""
    out: LabelMap = {}
    for item in items:
        name, sep, targets = item.partition("=")
        name = name.strip()
        parts = tuple(t.strip() for t in targets.split("|"))
        if not sep or not name or not all(parts):
            raise ConfigError(
                f"{option} {item!r}: expected EXTERNAL=MODEL_LABEL[|MODEL_LABEL…], e.g. "
                "PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA"
            )
        if name in out:
            raise ConfigError(f"{option}: {name} is mapped twice")
        out[name] = tuple(dict.fromkeys(parts))
    return out


def check_mapped_folders(
    declared: Mapping[str, Sequence[str]], folder_labels: Iterable[str], *, where: object
) -> None:
    """One-line ConfigError naming the first mapped name that is no class folder of ``where``."""
    folders = set(folder_labels)
    absent = [name for name in declared if name not in folders]
    if absent:
        raise ConfigError(f"--label-map {absent[0]}: no class folder of that name in {where}")


def mapped_labels(
    folder_labels: Iterable[str], declared: Mapping[str, Sequence[str]]
) -> tuple[str, ...]:
    """The model labels a tree of class folders trains under ``declared``: its unmapped folder
    labels and every mapped target, sorted."""
    return tuple(sorted({t for f in folder_labels for t in declared.get(f, (f,))}))


def check_targets(
    declared: Mapping[str, Sequence[str]], allowed: Iterable[str], problem: str
) -> None:
    """One-line ConfigError naming the first mapping with a target outside ``allowed``."""
    allowed = set(allowed)
    for name, targets in declared.items():
        unknown = [t for t in targets if t not in allowed]
        if unknown:
            raise ConfigError(
                f"--label-map {name}={'|'.join(targets)}: {', '.join(unknown)} {problem}"
            )


def resolve_label_map(
    folder_labels: Sequence[str],
    model_labels: Sequence[str],
    declared: Mapping[str, Sequence[str]] | None,
    *,
    where: object,
) -> LabelMap:
    """Each folder label → the model labels that count as a correct answer.

    Declared mappings first; a folder label that is a model label maps to itself; any other
    folder label is an error naming it. A declared target that is not a model label is too.
    """
    declared = dict(declared or {})
    model = list(model_labels)
    check_targets(declared, model, f"is not a label of the model ({', '.join(model)})")
    unknown = [label for label in folder_labels if label not in declared and label not in model]
    if unknown:
        raise ConfigError(
            f"{where}: class folders {unknown} are not among the model's labels {model}; "
            f"declare what they count as with --label-map (e.g. '{unknown[0]}=LABEL|LABEL')"
        )
    return {label: tuple(declared.get(label, (label,))) for label in folder_labels}


def is_identity(mapping: Mapping[str, Sequence[str]]) -> bool:
    return all(tuple(v) == (k,) for k, v in mapping.items())


# --------------------------------------------------------------------------------------------
# per source


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "rate": k / n if n else None, "ci95": wilson_interval(k, n)}


def per_source(
    true_labels: Sequence[str],
    predicted: Sequence[str],
    sources: Sequence[str | None],
    model_labels: Sequence[str],
    *,
    mapping: Mapping[str, Sequence[str]] | None = None,
    positive: str = POSITIVE,
) -> dict[str, dict[str, Any]]:
    """Per source data set: accuracy (under ``mapping``), confusion matrix (true label × model
    label), per-true-class accuracy and, when ``positive`` is a model label, how many films whose
    true label does not include it were called ``positive``."""
    mapping = mapping or {t: (t,) for t in set(true_labels)}
    names = [s or UNKNOWN_SOURCE for s in sources]
    out: dict[str, dict[str, Any]] = {}
    for source in sorted(set(names)):
        idx = [i for i, n in enumerate(names) if n == source]
        rows = sorted({true_labels[i] for i in idx})
        matrix = [[0] * len(model_labels) for _ in rows]
        per_class: dict[str, dict[str, Any]] = {}
        correct = 0
        for i in idx:
            t, p = true_labels[i], predicted[i]
            matrix[rows.index(t)][list(model_labels).index(p)] += 1
            ok = p in mapping[t]
            correct += ok
            entry = per_class.setdefault(t, {"n": 0, "correct": 0})
            entry["n"] += 1
            entry["correct"] += int(ok)
        for entry in per_class.values():
            entry["accuracy"] = entry["correct"] / entry["n"]
        result: dict[str, Any] = {
            "n": len(idx),
            "accuracy": correct / len(idx),
            "accuracy_ci95": wilson_interval(correct, len(idx)),
            "confusion_matrix": {"rows": rows, "columns": list(model_labels), "counts": matrix},
            "per_class": per_class,
        }
        if positive in model_labels:
            negatives = [i for i in idx if positive not in mapping[true_labels[i]]]
            called = sum(predicted[i] == positive for i in negatives)
            result[f"non_{positive}_called_{positive}"] = _rate(called, len(negatives))
        out[source] = result
    return out


# --------------------------------------------------------------------------------------------
# source probe


def source_probe(
    features: np.ndarray,
    targets: Sequence[str],
    groups: Sequence[str],
    *,
    folds: int = PROBE_FOLDS,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated balanced accuracy of a linear probe predicting ``targets`` from
    ``features``: standardised features, ``LogisticRegression``, ``StratifiedGroupKFold`` by
    patient (``groups``). ``available`` is False (with ``reason``) when fewer than 2 classes
    or fewer than 2 patients per class make the folds impossible."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(list(targets))
    g = np.asarray(list(groups))
    classes = sorted(set(y.tolist()))
    counts = {c: len(set(g[y == c].tolist())) for c in classes}
    base = {"classes": classes, "patients_per_class": counts, "n": len(y)}
    if len(classes) < 2:
        return {**base, "available": False, "reason": "fewer than 2 classes"}
    k = min(folds, *counts.values())
    if k < 2:
        return {**base, "available": False, "reason": "a class has fewer than 2 patients"}
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    pred = cross_val_predict(probe, x, y, groups=g, cv=cv)
    return {
        **base,
        "available": True,
        "folds": k,
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "adjusted": float(balanced_accuracy_score(y, pred, adjusted=True)),
        "chance": 1.0 / len(classes),
    }


def probe_pair(
    features: np.ndarray,
    labels: Sequence[str],
    sources: Sequence[str | None],
    groups: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The source probe beside the label probe; ``flagged`` when source is easier to read
    (chance-adjusted balanced accuracy, so 2 sources and 4 labels compare fairly)."""
    known = [i for i, s in enumerate(sources) if s]
    f = np.asarray(features)[known]
    src: dict[str, Any] = {"available": False, "reason": "no image's source is known", "n": 0}
    if known:
        known_sources = [str(sources[i]) for i in known]  # known: those with a source
        src = source_probe(f, known_sources, [groups[i] for i in known], seed=seed)
    lab = source_probe(features, labels, groups, seed=seed)
    flagged = None
    if src.get("available") and lab.get("available"):
        flagged = src["adjusted"] > lab["adjusted"]
    return {"source": src, "label": lab, "flagged": flagged,
            "features": int(np.asarray(features).shape[1])}  # fmt: skip


def pooled_features(model: Any, loader: Any, device: Any) -> np.ndarray:
    """The model's penultimate (globally pooled, pre-logits) features for every item."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for x, _ in loader:
            feats = model.forward_head(model.forward_features(x.to(device)), pre_logits=True)
            out.append(feats.flatten(1).double().cpu())
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------------------------
# the audit and the external scores


def shortcut_audit(
    *,
    true_labels: Sequence[str],
    predicted: Sequence[str],
    sources: Sequence[str | None],
    groups: Sequence[str],
    features: np.ndarray,
    model_labels: Sequence[str],
    mapping: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """``{"per_source", "probe", "flagged"}`` for one assessment (see the module docstring)."""
    probe = probe_pair(features, true_labels, sources, groups)
    return {
        "positive": POSITIVE if POSITIVE in model_labels else None,
        "per_source": per_source(true_labels, predicted, sources, model_labels, mapping=mapping),
        "probe": probe,
        "flagged": probe["flagged"],
        "sources_known": sum(1 for s in sources if s),
    }


def external_metrics(
    true_labels: Sequence[str],
    predicted: Sequence[str],
    mapping: Mapping[str, Sequence[str]],
    *,
    positive: str = POSITIVE,
) -> dict[str, Any]:
    """Scores of a folder under a declared label mapping: accuracy (a prediction is correct when
    it is one of the true label's model labels), per folder label what it was called, the
    positive class's sensitivity and the share of non-positive films called positive."""
    n = len(true_labels)
    right = [p in mapping[t] for t, p in zip(true_labels, predicted, strict=True)]
    per_label = {}
    for label in sorted(set(true_labels)):
        idx = [i for i, t in enumerate(true_labels) if t == label]
        k = sum(right[i] for i in idx)
        per_label[label] = {
            "maps_to": list(mapping[label]),
            **_rate(k, len(idx)),
            "called": dict(Counter(predicted[i] for i in idx)),
        }
    pos = [i for i, t in enumerate(true_labels) if tuple(mapping[t]) == (positive,)]
    neg = [i for i, t in enumerate(true_labels) if positive not in mapping[t]]
    return {
        "label_map": {k: list(v) for k, v in mapping.items()},
        "n": n,
        "accuracy": _rate(sum(right), n),
        "per_label": per_label,
        f"{positive}_sensitivity": _rate(sum(predicted[i] == positive for i in pos), len(pos)),
        f"non_{positive}_called_{positive}": _rate(
            sum(predicted[i] == positive for i in neg), len(neg)
        ),
        "ood": {"measured": False, "text": "not measured (give --onnx MODEL.onnx)"},
    }
