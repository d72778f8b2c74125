"""The reliability suite reuses the federated fixture ``fed`` of tests/e2e (one definition)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "e2e_conftest", Path(__file__).resolve().parents[1] / "e2e" / "conftest.py"
)
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)

fed = _e2e.fed
net = _e2e.net
