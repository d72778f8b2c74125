"""The colour maps fedbridge draws attribution maps with, everywhere (report, explain, edge).

Unsigned maps (saliency, Grad-CAM, the bedside CAM) use ``inferno`` from 0; signed maps (SHAP,
integrated gradients, the report's signed CAM) use ``bwr`` symmetric around 0. Names only, so
the torch- and matplotlib-free bedside can import it (OpenCV's inferno is matplotlib's).
"""

UNSIGNED_CMAP = "inferno"
SIGNED_CMAP = "bwr"

#: One colour per curve name in every report chart (a series keeps its colour across charts).
SERIES_COLOURS = {
    "train": "#1f77b4",
    "val": "#ff7f0e",
    "federated_val": "#ff7f0e",
    "server_val": "#2ca02c",
    "test": "#d62728",
}
#: Sites, in sorted-name order, take these in turn (none is a series colour above).
SITE_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79")


def series_colour(name: str) -> str:
    """The colour of a curve called ``name`` (``train_loss`` and ``train_accuracy`` share one)."""
    base = name.removesuffix("_loss").removesuffix("_accuracy")
    if base in SERIES_COLOURS:
        return SERIES_COLOURS[base]
    return SITE_COLOURS[sum(map(ord, base)) % len(SITE_COLOURS)]


def site_colours(names: list[str]) -> dict[str, str]:
    """A distinct colour per site name, by sorted position (the same in every chart)."""
    return {n: SITE_COLOURS[i % len(SITE_COLOURS)] for i, n in enumerate(sorted(names))}
