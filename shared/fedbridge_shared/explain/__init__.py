"""Explain predictions: captum attribution maps, CAM, overlays, region summary and sanity check.

Every map is computed on the model in eval mode, with respect to the *greyscale* input pixels
(the model's channel repetition and normalisation are folded into :class:`GreyModel`), and is
returned at the model's input resolution as a float32 ``(H, W)`` array.
"""

from fedbridge_shared.explain.methods import (
    METHODS,
    SIGNED_METHODS,
    GreyModel,
    attribute,
    class_activation_map,
    load_explainer,
)
from fedbridge_shared.explain.regions import BORDER_FRACTION, region_fractions
from fedbridge_shared.explain.sanity import SANITY_THRESHOLD, sanity_check

__all__ = [
    "BORDER_FRACTION",
    "METHODS",
    "SANITY_THRESHOLD",
    "SIGNED_METHODS",
    "GreyModel",
    "attribute",
    "class_activation_map",
    "load_explainer",
    "region_fractions",
    "sanity_check",
]
