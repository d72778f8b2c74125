"""The colour maps fedbridge draws attribution maps with, everywhere (report, explain, edge).

Unsigned maps (saliency, Grad-CAM, the bedside CAM) use ``inferno`` from 0; signed maps (SHAP,
integrated gradients, the report's signed CAM) use ``bwr`` symmetric around 0. Names only, so
the torch- and matplotlib-free bedside can import it (OpenCV's inferno is matplotlib's).
"""

UNSIGNED_CMAP = "inferno"
SIGNED_CMAP = "bwr"
