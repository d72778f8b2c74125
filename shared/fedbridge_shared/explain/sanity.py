"""Model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

For each method, maps of K images on the trained model are compared with maps of the same
images, for the same target class (the trained model's prediction), on the same architecture
with **all layers re-initialised at once** (the end point of Adebayo's cascading
randomisation: timm's own initialisation from a fixed seed, fresh batch-norm statistics). The
comparison is the Spearman rank correlation of the absolute maps, flattened, per image. A map
that explains the model must change when the model is destroyed: a method whose mean ``|rho|``
exceeds :data:`SANITY_THRESHOLD` mostly shows the image (edges, contrast), not the model, and
is flagged "fails sanity check".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from fedbridge_shared.explain.methods import (
    GreyModel,
    attribute,
    images_to_batch,
    load_explainer,
    predict_probs,
)
from fedbridge_shared.models import build_model
from fedbridge_shared.spec import Bundle

SANITY_THRESHOLD = 0.5
"""Mean |Spearman rho| above which a method's maps "barely change" under randomisation."""

RANDOMISATION = "all layers re-initialised (timm init, seeded); cascade end point"


def randomised_explainer(bundle: Bundle, device: torch.device | str, seed: int = 0) -> GreyModel:
    """The bundle's architecture with every weight freshly initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_state = build_model(bundle.spec).state_dict()
    return load_explainer(bundle, device, state_dict=random_state)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rho of ``|a|`` and ``|b|`` flattened.

    A constant map has no ranking: against a varying map that is no agreement (0.0); two
    constant maps give ``None`` (undefined).
    """
    x, y = np.abs(np.ravel(a)), np.abs(np.ravel(b))
    flat_x, flat_y = np.ptp(x) == 0, np.ptp(y) == 0
    if flat_x and flat_y:
        return None
    if flat_x or flat_y:
        return 0.0
    return float(spearmanr(x, y).statistic)


def sanity_steps(methods: Sequence[str]) -> int:
    """How many times :func:`sanity_check` calls ``on_step`` (a progress bar's total)."""
    return 1 + 2 * len(methods)


def sanity_check(
    bundle: Bundle,
    images: Sequence[np.ndarray],
    methods: Sequence[str],
    device: torch.device | str = "cpu",
    seed: int = 0,
    threshold: float = SANITY_THRESHOLD,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Compare each method's maps on the trained and the randomised model for ``images``.

    ``on_step`` is called after the models are set up and after each map batch:
    :func:`sanity_steps` times in all.

    Returns ``{"randomisation", "threshold", "n_images", "methods": {method: {"rho": [...],
    "mean_abs_rho", "fails"}}}``. An undefined correlation (a constant map) is listed as
    ``None`` and left out of the mean.
    """
    trained = load_explainer(bundle, device)
    randomised = randomised_explainer(bundle, device, seed)
    x = images_to_batch(images, device)
    target = predict_probs(trained, x).argmax(dim=1)
    step = on_step or (lambda: None)
    step()
    result: dict[str, Any] = {
        "randomisation": RANDOMISATION,
        "comparison": "Spearman rank correlation of |map|, per image, same target class",
        "threshold": threshold,
        "n_images": len(images),
        "methods": {},
    }
    for method in methods:
        a = attribute(method, trained, x, target, seed=seed)
        step()
        b = attribute(method, randomised, x, target, seed=seed)
        step()
        rhos = [rank_correlation(a[i], b[i]) for i in range(len(images))]
        valid = [abs(r) for r in rhos if r is not None]
        mean_abs = float(np.mean(valid)) if valid else None
        result["methods"][method] = {
            "rho": rhos,
            "mean_abs_rho": mean_abs,
            "fails": mean_abs is not None and mean_abs > threshold,
        }
    return result
