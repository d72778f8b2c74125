"""Where the model looks: the share of a map's absolute mass in image regions.

Left/right are the *image's* halves (on a PA chest X-ray the patient's right is the image's
left). The border band is the outer ``BORDER_FRACTION`` of each side; the rest is the centre.
A model that relies on text markers, collimation edges or the source hospital's framing puts
much more mass in the border than its area share (``border_area``) would suggest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

BORDER_FRACTION = 0.15
"""Width of the border band as a fraction of the image's height (top/bottom) and width."""

REGIONS: tuple[str, ...] = ("left", "right", "centre", "border")


def _half_weights(n: int) -> np.ndarray:
    """Weight of each of ``n`` columns in the left half (a middle column counts half)."""
    idx = np.arange(n) + 0.5
    weights: np.ndarray = np.clip(n / 2.0 - (idx - 0.5), 0.0, 1.0)
    return weights


def border_mask(shape: tuple[int, int], fraction: float = BORDER_FRACTION) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the border band."""
    h, w = shape
    bh, bw = int(round(h * fraction)), int(round(w * fraction))
    mask = np.ones((h, w), dtype=bool)
    mask[bh : h - bh, bw : w - bw] = False
    return mask


def region_fractions(
    amap: np.ndarray, fraction: float = BORDER_FRACTION
) -> dict[str, float | None]:
    """Shares of ``|amap|`` in the left/right halves and the centre/border band, each in [0, 1].

    ``left + right == 1`` and ``centre + border == 1``; ``border_area`` is the share of pixels in
    the border band, i.e. what ``border`` would be for a uniform map. An all-zero map gives
    ``None`` fractions (no mass to share).
    """
    a = np.abs(np.asarray(amap, dtype=np.float64))
    if a.ndim != 2:
        raise ValueError(f"map must be 2-D, got shape {a.shape}")
    mask = border_mask(a.shape, fraction)
    total = float(a.sum())
    out: dict[str, float | None] = {"border_area": float(mask.mean())}
    if total <= 0 or not np.isfinite(total):
        return {**dict.fromkeys(REGIONS), **out}
    left = float((a * _half_weights(a.shape[1])[None, :]).sum()) / total
    border = float(a[mask].sum()) / total
    return {"left": left, "right": 1.0 - left, "centre": 1.0 - border, "border": border, **out}


def summarise(
    rows: Iterable[Mapping[str, Any]], key: str
) -> dict[str, dict[str, float | int | None]]:
    """Mean region fractions per value of ``rows[i][key]`` (e.g. the predicted label)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get(key) is not None:
            groups.setdefault(str(row[key]), []).append(row)
    summary: dict[str, dict[str, float | int | None]] = {}
    for name in sorted(groups):
        members = groups[name]
        entry: dict[str, float | int | None] = {"n": len(members)}
        for region in (*REGIONS, "border_area"):
            values = [float(r[region]) for r in members if r.get(region) is not None]
            entry[region] = float(np.mean(values)) if values else None
        summary[name] = entry
    return summary
