"""Scores the bedside computes from a graph's logits (numpy only)."""

from __future__ import annotations

import numpy as np


def energy(logits: np.ndarray) -> np.ndarray:
    """Free energy −logsumexp(logits) per row (higher = less familiar); reported, not used."""
    top = logits.max(1, keepdims=True)
    free: np.ndarray = -(top[:, 0] + np.log(np.exp(logits - top).sum(1)))
    return free


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    probs: np.ndarray = e / e.sum(1, keepdims=True)
    return probs
