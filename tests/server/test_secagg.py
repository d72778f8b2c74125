"""Secure aggregation: the real crypto of both ends, driven step by step (no network)."""

from __future__ import annotations

import numpy as np
import pytest

from fedbridge_client import secagg as C
from fedbridge_server.secagg import Aggregator, threshold
from fedbridge_shared import secagg as S

CLIP = 4.0
STEP = 2 * CLIP / (S.LEVELS - 1)


def _protocol(deltas, weights, *, drop_after_sharing=(), drop_before_sharing=()):
    """Run the four steps for sites 11, 22, 33, … and return the aggregate, the masked vectors
    the coordinator saw, and the survivors."""
    ids = [11 * (k + 1) for k in range(len(deltas))]
    states = {i: {} for i in ids}
    agg = Aggregator(clip=CLIP, threshold=threshold(len(ids)))
    agg.keys({i: tuple(C.setup(states[i]).values()) for i in ids})
    sent = {
        i: C.share(states[i], own=i, publics=agg.publics, threshold=agg.threshold)
        for i in ids
        if i not in drop_before_sharing
    }
    inboxes = agg.route(sent)
    masked = {}
    for k, i in enumerate(ids):
        if i in agg.sharers and i not in drop_after_sharing:
            vec, clipped = C.mask(
                states[i], own=i, participants=agg.sharers, inbox=inboxes[i],
                delta=deltas[k], weight=weights[k], clip=CLIP,
            )  # fmt: skip
            assert clipped == 0
            masked[i] = (vec, weights[k])
    alive, dropped = agg.survivors(masked)
    shares = {i: C.unmask(states[i], survivors=alive, dropped=dropped) for i in alive}
    mean, total = agg.unmask(masked, shares)
    return mean, total, masked, alive


def _fedavg(deltas, weights, keep):
    w = np.array([weights[k] for k in keep], dtype=np.float64)
    return sum(w[n] * deltas[k] for n, k in enumerate(keep)) / w.sum()


@pytest.fixture
def updates():
    rng = np.random.default_rng(7)
    deltas = [rng.normal(0, 0.05, 5000).astype(np.float32) for _ in range(3)]
    return deltas, [120, 37, 301]


def test_secure_sum_equals_weighted_fedavg_within_quantisation(updates):
    deltas, weights = updates
    mean, total, _, alive = _protocol(deltas, weights)
    assert len(alive) == 3 and total == sum(weights)
    expected = _fedavg(deltas, weights, [0, 1, 2])
    assert np.max(np.abs(mean - expected)) <= STEP  # ≤ half a step per site, weighted
    assert not np.allclose(mean, np.mean(deltas, axis=0), atol=1e-4)  # weights do matter


def test_survives_one_site_lost_after_sharing(updates):
    deltas, weights = updates
    mean, total, masked, alive = _protocol(deltas, weights, drop_after_sharing=(22,))
    assert alive == [11, 33] and total == weights[0] + weights[2]
    assert np.max(np.abs(mean - _fedavg(deltas, weights, [0, 2]))) <= STEP


def test_survives_one_site_lost_before_sharing(updates):
    deltas, weights = updates
    mean, _, _, alive = _protocol(deltas, weights, drop_before_sharing=(33,))
    assert alive == [11, 22]
    assert np.max(np.abs(mean - _fedavg(deltas, weights, [0, 1]))) <= STEP


def test_two_of_three_lost_is_refused(updates):
    deltas, weights = updates
    with pytest.raises(S.SecAggError, match="fewer than the threshold 2"):
        _protocol(deltas, weights, drop_after_sharing=(22, 33))


def test_coordinators_view_of_one_site_is_uncorrelated_with_its_update(updates):
    deltas, weights = updates
    _, _, masked, _ = _protocol(deltas, weights)
    seen = masked[11][0].astype(np.float64)
    true = deltas[0].astype(np.float64)
    r = np.corrcoef(seen, true)[0, 1]
    assert abs(r) < 4 / np.sqrt(true.size)  # |r| of independent samples: ~ 1/sqrt(n)
    # and unmasking one site alone is impossible: its own quantised update is not in view
    q, _ = S.quantize(true, CLIP)
    assert np.count_nonzero(seen == (q * np.uint64(weights[0])).astype(np.float64)) < 10


def test_site_refuses_to_reveal_both_secrets_of_one_site(updates):
    deltas, weights = updates
    ids = [1, 2, 3]
    states = {i: {} for i in ids}
    agg = Aggregator(clip=CLIP, threshold=2)
    agg.keys({i: tuple(C.setup(states[i]).values()) for i in ids})
    inboxes = agg.route(
        {i: C.share(states[i], own=i, publics=agg.publics, threshold=2) for i in ids}
    )
    C.mask(
        states[1], own=1, participants=ids, inbox=inboxes[1], delta=deltas[0], weight=1,
        clip=CLIP,
    )  # fmt: skip
    with pytest.raises(S.SecAggError, match="both as survivor and as dropped"):
        C.unmask(states[1], survivors=[1, 2], dropped=[2])
    with pytest.raises(S.SecAggError, match="fewer than the threshold"):
        C.unmask(states[1], survivors=[1], dropped=[2, 3])


def test_clipping_is_counted():
    q, clipped = S.quantize(np.array([0.0, CLIP * 2, -CLIP * 3, 1.0]), CLIP)
    assert clipped == 2
    back = S.dequantize_sum(q, 1, CLIP)
    assert np.allclose(back, [0.0, CLIP, -CLIP, 1.0], atol=STEP)
