"""A label the bedside calls only at or above a probability chosen at export (issue #29).

A model that learnt "adult film ⇒ COVID19" calls too many adult normal and pneumonia films
COVID19, and a false COVID call sends a patient down the wrong pathway. ``fedbridge export onnx
--cutoff COVID19=0.10 --cutoff-data FOLDER`` chooses the lowest P(COVID19) at which at most 10 %
of FOLDER's films that are *not* COVID19 (held-out adult films of the hospital's population, any
class folder names) would be called COVID19. The bedside then calls COVID19 iff P(COVID19) ≥ the
cut-off, else the most probable other label. Numpy only: the bedside runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbridge_edge.errors import EdgeError

MIN_NEGATIVES = 20  # fewer films than this cannot place a 10 % cut-off (2 films above it)
MAX_RATE = 0.5
APPLIES = "label = LABEL iff P(LABEL) >= cutoff, else the most probable other label"


@dataclass(frozen=True)
class Cutoff:
    """``label`` (index ``index``) is called iff its probability is ≥ ``value``."""

    label: str
    index: int
    value: float

    def decide(self, probs: np.ndarray) -> int:
        """The called label's index for one image's probabilities."""
        if probs[self.index] >= self.value:
            return self.index
        others = np.array(probs, dtype=np.float64)
        others[self.index] = -np.inf
        return int(others.argmax())


def parse(text: str) -> tuple[str, float]:
    """``"COVID19=0.10"`` → ``("COVID19", 0.1)``; a one-line EdgeError naming ``--cutoff``."""
    label, sep, rate = text.partition("=")
    try:
        value = float(rate)
    except ValueError:
        value = float("nan")
    if not sep or not label.strip() or not 0 < value <= MAX_RATE:
        raise EdgeError(
            f"--cutoff {text!r}: expected LABEL=RATE with RATE in (0, {MAX_RATE}], the most of "
            "the --cutoff-data films that are not LABEL the bedside may call LABEL, e.g. "
            "COVID19=0.10"
        )
    return label.strip(), value


def check_label(label: str, labels: list[str] | tuple[str, ...]) -> None:
    """A one-line EdgeError when the model has no label ``label``."""
    if label not in labels:
        raise EdgeError(f"--cutoff {label}: not a label of this model ({', '.join(labels)})")


def choose(p_negative: np.ndarray, rate: float) -> float:
    """The lowest cut-off at which at most ``rate`` of the negatives' probabilities lie at or
    above it (ties stay below: the cut-off is just above the first probability it excludes)."""
    ranked = np.sort(np.asarray(p_negative, dtype=np.float64))[::-1]
    allowed = int(np.floor(rate * len(ranked) + 1e-9))
    if allowed >= len(ranked):
        return 0.0
    return float(np.nextafter(ranked[allowed], np.inf))


def record(
    probs: np.ndarray, folders: list[str], *, label: str, labels: list[str], rate: float, root: str
) -> dict[str, Any]:
    """``edge["decision"]``: the cut-off chosen on ``probs`` (N, K) of the --cutoff-data films
    (their class folder names in ``folders``), and what it does on those films."""
    k = labels.index(label)
    is_label = np.array([f == label for f in folders])
    negative, positive = probs[~is_label, k], probs[is_label, k]
    if len(negative) < MIN_NEGATIVES:
        raise EdgeError(
            f"--cutoff-data {root}: {len(negative)} films that are not {label}; choosing a "
            f"cut-off needs at least {MIN_NEGATIVES}"
        )
    value = choose(negative, rate)
    return {
        "rule": "cutoff",
        "label": label,
        "cutoff": value,
        "max_false_rate": rate,
        "negatives": int(len(negative)),
        "false_rate": float((negative >= value).mean()),
        "argmax_false_rate": float((probs[~is_label].argmax(1) == k).mean()),
        "positives": int(len(positive)),
        "recognised": float((positive >= value).mean()) if len(positive) else None,
        "folders": sorted(set(folders)),
        "data": root,
        "applies": APPLIES.replace("LABEL", label),
    }


def from_edge(
    edge: dict[str, Any], labels: list[str] | tuple[str, ...], path: Path
) -> Cutoff | None:
    """The model file's cut-off (None: the plain argmax); a malformed one is an EdgeError."""
    decision = edge.get("decision")
    if decision is None:
        return None
    label, value = decision.get("label"), decision.get("cutoff")
    if (
        decision.get("rule") != "cutoff"
        or label not in labels
        or not isinstance(value, int | float)
        or not 0.0 <= value <= 1.0
    ):
        raise EdgeError(f"{path}: its decision rule {decision!r} is not a cut-off on a label")
    return Cutoff(label=str(label), index=list(labels).index(label), value=float(value))
