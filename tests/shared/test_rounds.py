"""The round-history row keys are named once (fedbridge_shared.rounds): the constants and the
RoundRow type name the same keys, each constant spelled as its key."""

from __future__ import annotations

from fedbridge_shared import rounds


def test_the_constants_are_exactly_the_typed_rows_keys():
    constants = {v for k, v in vars(rounds).items() if k.isupper() and isinstance(v, str)}
    assert constants == set(rounds.RoundRow.__annotations__) == rounds.KEYS
    for name in (k for k in vars(rounds) if k.isupper() and k != "KEYS"):
        assert getattr(rounds, name) == name.lower()  # ROUND = "round", PER_SITE = "per_site"
