"""Test-time augmentation: softmax probabilities averaged over a few deterministic views.

A view is an affine resampling of the normalised input (``grid_sample``, border padding): a
small scale-up, small shifts, and a left-right flip only where anatomy allows it. A chest
radiograph is never flipped (the heart is on the left; laterality matters), nor is an image of
an unknown modality: only a model whose spec says ``oct`` gets the flipped view.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fedbridge_shared.engine import BatchHook

SCALE = 1.1
"""Zoom of the scale-up view (the central 1/1.1 of the image fills the input)."""
SHIFT = 0.05
"""Shift of the shift views, as a share of the image side."""
VIEWS = ("identity", "scale", "shift-left", "shift-right", "shift-up", "shift-down", "hflip")


def views_for(modality: str) -> tuple[str, ...]:
    """The views for a model of this modality (``ModelSpec.modality``): ``hflip`` only for OCT."""
    if modality == "oct":
        return VIEWS
    return tuple(v for v in VIEWS if v != "hflip")


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """One view of a batch ``(B, C, H, W)``; ``identity`` returns ``x`` itself."""
    if view == "identity":
        return x
    if view == "hflip":
        return torch.flip(x, dims=[3])
    theta = {
        "scale": ((1 / SCALE, 0, 0), (0, 1 / SCALE, 0)),
        # grid coordinates span [-1, 1], so a shift of SHIFT of the side is 2 * SHIFT
        "shift-left": ((1, 0, 2 * SHIFT), (0, 1, 0)),
        "shift-right": ((1, 0, -2 * SHIFT), (0, 1, 0)),
        "shift-up": ((1, 0, 0), (0, 1, 2 * SHIFT)),
        "shift-down": ((1, 0, 0), (0, 1, -2 * SHIFT)),
    }.get(view)
    if theta is None:
        raise ValueError(f"TTA view {view!r}: must be one of {', '.join(VIEWS)}")
    t = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def predict_tta(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    *,
    views: Sequence[str],
    on_batch: BatchHook | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`~fedbridge_shared.engine.predict`, probabilities averaged over ``views``."""
    if not views:
        raise ValueError("TTA needs at least one view")
    model.eval()
    ys, ps = [], []
    for x, y in loader:
        x = x.to(device)
        p = sum(torch.softmax(model(apply_view(x, v)), dim=1).double() for v in views)
        ps.append((cast(torch.Tensor, p) / len(views)).cpu())  # a sum of tensors
        ys.append(torch.as_tensor(y))
        if on_batch:
            on_batch(len(y))
    return torch.cat(ys).numpy(), torch.cat(ps).numpy()
