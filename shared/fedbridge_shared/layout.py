"""Names of what fedbridge writes: a bundle's two files and the folders beside a run's ``OUT``.

No torch here, so the coordinator's status, tracking and the bedside read the same names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


def beside(out: Path, what: Literal["rounds", "superlink"]) -> Path:
    """``OUT-rounds`` (the round store) or ``OUT-superlink`` (Flower's state, logs and app
    folder) beside the final bundle ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}-{what}")
