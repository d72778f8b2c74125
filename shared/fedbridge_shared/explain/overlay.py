"""Heatmap overlays as PNG bytes (matplotlib ``Figure``, no pyplot, no GUI backend).

Signed maps (SHAP, IG, CAM) use the paper's diverging red/blue (``bwr``) symmetric around 0:
red pixels push the score of the target class up, blue pixels push it down. Unsigned maps
(saliency, Grad-CAM) use ``inferno`` from 0. The colour scale is clipped at the 99th
percentile of ``|map|`` so one hot pixel does not wash the rest out, and each pixel's opacity
grows with ``|value|`` so unimportant regions show the image underneath.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from fedbridge_shared.colours import SIGNED_CMAP, UNSIGNED_CMAP
from fedbridge_shared.explain.methods import SIGNED_METHODS

MAX_ALPHA = 0.75
CLIP_PERCENTILE = 99.0


def colour_scale(amap: np.ndarray, signed: bool) -> Normalize:
    """The colour normalisation: ``[-m, m]`` for signed maps, ``[0, m]`` otherwise."""
    m = float(np.percentile(np.abs(amap), CLIP_PERCENTILE)) if amap.size else 0.0
    if not np.isfinite(m) or m <= 0:
        m = float(np.abs(amap).max()) if amap.size else 0.0
    m = m if m > 0 else 1.0
    return Normalize(-m, m) if signed else Normalize(0.0, m)


def heat_rgba(amap: np.ndarray, signed: bool) -> tuple[np.ndarray, ScalarMappable]:
    """RGBA ``(H, W, 4)`` heat layer with opacity ∝ ``|value|``, and its colour mapping."""
    amap = np.asarray(amap, dtype=np.float64)
    norm = colour_scale(amap, signed)
    cmap = colormaps[SIGNED_CMAP if signed else UNSIGNED_CMAP]
    rgba = cmap(norm(amap))
    top = abs(norm.vmax or 0.0)  # colour_scale always sets vmax
    rgba[..., 3] = MAX_ALPHA * np.clip(np.abs(amap) / max(top, 1e-12), 0.0, 1.0)
    return rgba, ScalarMappable(norm=norm, cmap=cmap)


def draw_overlay(ax: Axes, image: np.ndarray, amap: np.ndarray, signed: bool) -> ScalarMappable:
    """Draw the greyscale ``image`` with ``amap`` over it on ``ax``; returns the colour map."""
    rgba, mappable = heat_rgba(amap, signed)
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.imshow(rgba, interpolation="nearest")
    ax.set_axis_off()
    return mappable


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def overlay_png(image: np.ndarray, amap: np.ndarray, method: str, title: str = "") -> bytes:
    """Two panels, the image and the image with its ``method`` map over it, as PNG bytes."""
    signed = method in SIGNED_METHODS
    fig = Figure(figsize=(7.2, 3.8))
    left, right = fig.subplots(1, 2)
    left.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    left.set_axis_off()
    left.set_title("input", fontsize=9)
    mappable = draw_overlay(right, image, amap, signed)
    right.set_title(method + (" (red +, blue −)" if signed else ""), fontsize=9)
    fig.colorbar(mappable, ax=right, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def thumbnail_png(image: np.ndarray, amap: np.ndarray, method: str, size_in: float = 2.2) -> bytes:
    """One small overlay panel without axes or colour bar (for report grids)."""
    fig = Figure(figsize=(size_in, size_in))
    ax = fig.add_axes((0, 0, 1, 1))
    draw_overlay(ax, image, amap, method in SIGNED_METHODS)
    return figure_png(fig, dpi=80)


def colourbar_png(signed: bool) -> bytes:
    """The legend of the report's thumbnails: a horizontal colour bar of the map's scale.

    Each thumbnail is scaled on its own (to its 99th percentile of ``|map|``), so the bar is
    relative: ``0`` to that image's maximum (unsigned), or ``−max`` to ``+max`` around 0 (signed).
    """
    fig = Figure(figsize=(4.2, 0.9))
    ax = fig.add_axes((0.08, 0.55, 0.84, 0.3))
    norm = Normalize(-1.0, 1.0) if signed else Normalize(0.0, 1.0)
    mappable = ScalarMappable(norm=norm, cmap=colormaps[SIGNED_CMAP if signed else UNSIGNED_CMAP])
    bar = fig.colorbar(mappable, cax=ax, orientation="horizontal")
    if signed:
        bar.set_ticks([-1, 0, 1], labels=["−max (lowers)", "0", "+max (raises)"])
    else:
        bar.set_ticks([0, 1], labels=["0 (none)", "image's max"])
    bar.ax.tick_params(labelsize=8)
    ticks = bar.ax.get_xticklabels()
    ticks[0].set_horizontalalignment("left")  # the end labels stay inside the figure
    ticks[-1].set_horizontalalignment("right")
    return figure_png(fig, dpi=100)
