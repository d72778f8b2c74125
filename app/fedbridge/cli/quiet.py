"""Third-party noise kept off an admin's console: named messages only, never all warnings.

Flower logs a deprecation of ``run_simulation`` (the one-machine runtime fedbridge uses on
purpose) and Ray warns about a future change of its GPU-visibility default on every start; both
say nothing the user can act on. Everything else, including other Flower and Ray warnings,
still shows.
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex) pairs silenced for the whole process
_WARNINGS = (
    # ray.init: "Tip: In future versions of Ray, Ray will no longer override accelerator …".
    # Not silenced with RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0: that would also let simulated
    # sites (num_gpus=0) see the GPUs, a change of behaviour.
    (FutureWarning, r"Tip: In future versions of Ray"),
)
# Flower's log lines (logger "flwr") dropped when they contain one of these
_FLOWER_LINES = ("DEPRECATED FEATURE: The `run_simulation` function is deprecated",)


class _DropFlowerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: let Flower's handler deal with it
            return True
        return not any(line in text for line in _FLOWER_LINES)


def quiet_third_party() -> None:
    """Install the filters (idempotent); call once at the entry point, before any import of
    flwr or ray."""
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropFlowerNoise) for f in logger.filters):
        logger.addFilter(_DropFlowerNoise())
