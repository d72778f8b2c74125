"""One row of a federation's round history, named once.

The coordinator's round loop writes one row per round (``state.json`` and ``model.json``
``training.history``); ``server status``, the best-round rule, ``release``, the report and the
tracking export read them. They all spell the keys through the constants below;
:class:`RoundRow` gives each key its type (tests check the two agree and that the loop writes
no other key).
"""

from __future__ import annotations

from typing import Any, Final, TypedDict

ROUND: Final = "round"
SITES: Final = "sites"
DROPPED: Final = "dropped"
TRAIN_LOSS: Final = "train_loss"
TRAIN_ACCURACY: Final = "train_accuracy"
FEDERATED_VAL_LOSS: Final = "federated_val_loss"
FEDERATED_VAL_ACCURACY: Final = "federated_val_accuracy"
PER_SITE: Final = "per_site"
PRIVACY: Final = "privacy"
SECURE_AGGREGATION: Final = "secure_aggregation"
SERVER_VAL_LOSS: Final = "server_val_loss"
SERVER_VAL_ACCURACY: Final = "server_val_accuracy"
SERVER_VAL_EXAMPLES: Final = "server_val_examples"
SCORE: Final = "score"
SECONDS: Final = "seconds"


class RoundRow(TypedDict, total=False):
    """A round's row (keys above; the optional ones only when that feature ran)."""

    round: int
    """1-based round number."""
    sites: list[str]
    """The sites whose training reply was aggregated."""
    dropped: list[str]
    """Why a site's reply was not used, one line each."""
    train_loss: float | None
    train_accuracy: float | None
    federated_val_loss: float | None
    """The sites' validation loss of the new global weights, weighted by their examples."""
    federated_val_accuracy: float | None
    per_site: dict[str, dict[str, Any]]
    """Each site's numbers this round (``train_*``, ``val_*``, counts by label)."""
    privacy: dict[str, Any]
    """Differential privacy spent so far (only with DP)."""
    secure_aggregation: dict[str, Any]
    """The masked exchange's counts (only with secure aggregation)."""
    server_val_loss: float
    """The coordinator's own validation set (only with ``--val-data``)."""
    server_val_accuracy: float
    server_val_examples: int
    score: float | None
    """What the best-round rule minimises: the server's validation loss, else the sites'."""
    seconds: float
    """The round's wall time."""


KEYS: Final = frozenset(RoundRow.__annotations__)
