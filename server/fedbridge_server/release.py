"""Which model a private federation releases: never a DP model that validates below its start.

Noise at a few sites can leave a model at chance; publishing it as "the federated result"
would replace a useful bridge with a useless one. The starting weights are scored on the same
validation the rounds are (the coordinator's ``--val-data`` when given, else the sites'
federated validation); if the best DP round's accuracy is lower, the starting bundle is the
result and the DP bundle is written beside it as ``<out>-dp-below-start``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ConfigRecord

from fedbridge_server.quorum import SnapshotGrid, exchange, wait_for_sites
from fedbridge_server.strategy import screen_replies, state_record
from fedbridge_shared import protocol as P
from fedbridge_shared import rounds as R
from fedbridge_shared.engine import evaluate

ASIDE = "-dp-below-start"


def start_accuracy(
    grid, strategy, cfg, *, state, model, val_loader, config: ConfigRecord, names: dict
) -> float | None:
    """Validation accuracy of the starting weights (None when nothing could score them)."""
    if val_loader is not None:
        model.load_state_dict(state, strict=False)
        return float(evaluate(model, val_loader, torch.device("cpu")).accuracy)
    if cfg.fraction_evaluate <= 0:
        return None
    connected = wait_for_sites(
        grid, expected=cfg.min_available_sites, quorum=1, timeout=cfg.join_timeout,
        what="scoring the starting model",
    )  # fmt: skip
    sent = list(
        strategy.configure_evaluate(0, state_record(state), config, SnapshotGrid(grid, connected))
    )
    usable, _ = screen_replies(sent, exchange(grid, sent, timeout=cfg.round_timeout), None, names)
    usable = [m for m in usable if float(m.content[P.METRICS].get(P.NUM_EXAMPLES, 0)) > 0]
    if len(usable) < max(1, cfg.min_evaluate_sites):
        return None
    metrics = strategy.aggregate_evaluate(0, usable)
    return float(P.EvalReply.from_metrics(metrics).val_accuracy) if metrics else None


def best_accuracy(row: dict) -> float | None:
    """The accuracy a round was chosen by (server validation first, as its score)."""
    for key in (R.SERVER_VAL_ACCURACY, R.FEDERATED_VAL_ACCURACY):
        if row.get(key) is not None:
            return float(row[key])
    return None


def aside(out: Path) -> Path:
    return out.with_name(out.name + ASIDE)
