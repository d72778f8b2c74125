"""Which round's global model is the run's result: chosen on a fixed set of patients.

A round's federated validation loss is a mean over the sites that answered it; a round that
lost a site is scored on fewer patients, so its loss is not comparable with a full round's.
Rules, in order:

* ``server-val``: the coordinator's ``--val-data`` scores every round's global model;
* ``same-sites``: the rounds evaluated by the run's full set of sites (every site that ever
  answered an evaluation), compared on their federated validation loss;
* ``common-sites``: no round had them all: every round rescored over the sites common to all
  evaluated rounds (per-site losses weighted by validation images);
* ``small-val``: the set those rules would rank on holds fewer than :data:`MIN_VAL_IMAGES`
  images: the last round (issue #29: on 20 images one film is 5 points, and the lowest loss
  systematically prefers the least-trained, least-confident round);
* ``last-round``: no validation at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedbridge_shared import rounds as R

MIN_VAL_IMAGES = 100  # one image = one point of accuracy; fewer cannot rank rounds

RULES = {
    "server-val": "lowest loss on the coordinator's validation set (--val-data)",
    "same-sites": "lowest federated validation loss among rounds evaluated by every site",
    "common-sites": "lowest validation loss over the sites common to all evaluated rounds",
    "small-val": f"the last round: fewer than {MIN_VAL_IMAGES} validation images cannot rank "
    "rounds (give the coordinator a larger --val-data)",
    "last-round": "no validation: the last round",
}


def choose_best(
    history: Sequence[dict[str, Any]], available: Callable[[int], bool] = lambda r: True
) -> tuple[int, float | None, str]:
    """``(round, score, rule)`` for ``history`` (the round rows); rounds for which
    ``available(round)`` is false (their checkpoint was pruned) are not chosen."""
    rows = [h for h in history if available(h[R.ROUND])]
    if not rows:
        return 0, None, "last-round"
    server = [h for h in rows if h.get(R.SERVER_VAL_LOSS) is not None]
    if server:
        sizes = [int(h[R.SERVER_VAL_EXAMPLES]) for h in server if R.SERVER_VAL_EXAMPLES in h]
        if sizes and min(sizes) < MIN_VAL_IMAGES:  # rows of an older store carry no size
            return rows[-1][R.ROUND], None, "small-val"
        best = min(server, key=lambda h: (h[R.SERVER_VAL_LOSS], h[R.ROUND]))
        return best[R.ROUND], float(best[R.SERVER_VAL_LOSS]), "server-val"
    evaluated = [h for h in rows if _evaluated(h)]
    everyone = set().union(*(_evaluated(h) for h in history if _evaluated(h)))
    full = [
        h
        for h in evaluated
        if _evaluated(h) == everyone and h.get(R.FEDERATED_VAL_LOSS) is not None
    ]
    if full and _images(full[0], everyone) < MIN_VAL_IMAGES:
        return rows[-1][R.ROUND], None, "small-val"
    if full:
        best = min(full, key=lambda h: (h[R.FEDERATED_VAL_LOSS], h[R.ROUND]))
        return best[R.ROUND], float(best[R.FEDERATED_VAL_LOSS]), "same-sites"
    common = set.intersection(*(_evaluated(h) for h in evaluated)) if evaluated else set()
    if common and _images(evaluated[0], common) < MIN_VAL_IMAGES:
        return rows[-1][R.ROUND], None, "small-val"
    if common:
        scored = [(_loss_over(h, common), h[R.ROUND]) for h in evaluated]
        loss, rnd = min(scored)
        return rnd, loss, "common-sites"
    return rows[-1][R.ROUND], None, "last-round"


def _evaluated(row: dict[str, Any]) -> set[str]:
    """The sites whose validation answer counted in ``row``."""
    return {n for n, s in (row.get(R.PER_SITE) or {}).items() if s.get("val_examples")}


def _images(row: dict[str, Any], sites: set[str]) -> int:
    """Validation images of ``sites`` in ``row``."""
    return int(sum(row[R.PER_SITE][s]["val_examples"] for s in sites))


def _loss_over(row: dict[str, Any], sites: set[str]) -> float:
    per = row[R.PER_SITE]
    n = sum(per[s]["val_examples"] for s in sites)
    return float(sum(per[s]["val_loss"] * per[s]["val_examples"] for s in sites) / n)
