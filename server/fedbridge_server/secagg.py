"""Secure aggregation at the coordinator: one training round in which only the sum is seen.

Four exchanges with the round's sites (see :mod:`fedbridge_shared.secagg` for the arithmetic and
:mod:`fedbridge_client.secagg` for a site's side): ``query.secagg_setup`` (public keys),
``query.secagg_share`` (encrypted Shamir shares, relayed unread), ``train.secagg`` (local
training; the reply holds the masked, sample-weighted update and the site's metrics) and
``query.secagg_unmask`` (shares that remove the masks). A site lost after sharing its keys is
survived while ``threshold`` sites remain (3 sites: threshold 2, one dropout).

Weighting: a site masks ``n_i·Δ_i`` and reports ``n_i`` (already in its metrics), so the
result is FedAvg's sample-weighted mean ``Σ n_i·Δ_i / Σ n_i`` up to the quantisation step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedbridge_server.quorum import QuorumError, exchange
from fedbridge_server.strategy import screen_replies, site_name
from fedbridge_shared import protocol as P
from fedbridge_shared import secagg as S
from fedbridge_shared.weights import pack, unpack

SECAGG = "secagg"  # the ConfigRecord of every secure aggregation message
SETUP, SHARE, TRAIN, UNMASK = (
    "query.secagg_setup",
    "query.secagg_share",
    "train.secagg",
    "query.secagg_unmask",
)


def threshold(sites: int) -> int:
    """Shares needed to unmask: a majority, and never fewer than 2."""
    return max(2, sites // 2 + 1)


def ids(values) -> str:
    return ",".join(str(v) for v in values)


def parse_ids(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v]


@dataclass
class Aggregator:
    """The coordinator's bookkeeping for one round (pure: no messages, testable alone)."""

    clip: float
    threshold: int
    publics: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    sharers: list[int] = field(default_factory=list)

    def keys(self, publics: dict[int, tuple[bytes, bytes]]) -> None:
        if len(publics) < self.threshold:
            raise S.SecAggError(
                f"{len(publics)} site(s) sent keys, fewer than the threshold {self.threshold}"
            )
        self.publics = dict(sorted(publics.items()))

    def route(self, sent: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Each sharer's inbox (sender → ciphertext) from what every sharer sent."""
        self.sharers = sorted(i for i, out in sent.items() if set(out) >= set(self.publics) - {i})
        if len(self.sharers) < self.threshold:
            raise S.SecAggError(
                f"{len(self.sharers)} site(s) shared keys, fewer than the threshold "
                f"{self.threshold}"
            )
        return {j: {i: sent[i][j] for i in self.sharers if i != j} for j in self.sharers}

    def survivors(self, masked: dict[int, object]) -> tuple[list[int], list[int]]:
        alive = sorted(i for i in masked if i in self.sharers)
        if len(alive) < self.threshold:
            raise S.SecAggError(
                f"{len(alive)} masked update(s), fewer than the threshold {self.threshold}"
            )
        return alive, [i for i in self.sharers if i not in alive]

    def unmask(
        self,
        masked: dict[int, tuple[np.ndarray, int]],
        shares: dict[int, dict[str, bytes]],
    ) -> tuple[np.ndarray, int]:
        """``(Σ n_i·Δ_i / Σ n_i, Σ n_i)`` from the masked vectors of the survivors and the
        shares ``threshold`` or more of them sent back."""
        alive, dropped = self.survivors(masked)
        if len(shares) < self.threshold:
            raise S.SecAggError(
                f"{len(shares)} site(s) sent unmasking shares, fewer than the threshold "
                f"{self.threshold}"
            )
        total = np.zeros(next(iter(masked.values()))[0].size, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in alive:
                total += masked[i][0]
            for i in alive:
                total -= S.prg(_combine(shares, f"seed-{i}"), total.size)
            for d in dropped:  # the pair masks the survivors added for a site now gone
                key = _combine(shares, f"key-{d}")
                for j in alive:
                    total += S.pair_mask(key, d, j, self.publics[j][1], total.size)
        weight_sum = sum(int(masked[i][1]) for i in alive)
        if not 0 < weight_sum < S.MAX_WEIGHT_SUM:
            raise S.SecAggError(f"the sites' sample counts sum to {weight_sum}")
        return S.dequantize_sum(total, weight_sum, self.clip) / weight_sum, weight_sum


def _combine(shares: dict[int, dict[str, bytes]], key: str) -> bytes:
    got = [s[key] for s in shares.values() if key in s]
    try:
        secret = combine_shares(got)
    except (ValueError, IndexError) as e:
        raise S.SecAggError(f"could not rebuild {key} from {len(got)} share(s): {e}") from None
    if len(secret) != 32:
        raise S.SecAggError(f"rebuilt {key} has {len(secret)} bytes, not 32")
    return secret


@dataclass
class SecureRound:
    """What :func:`secure_round` hands back to the round loop."""

    state: dict[str, torch.Tensor]
    usable: list[Message]  # the train replies that were summed (their metrics only matter)
    dropped: list[str]
    metrics: MetricRecord | None
    info: dict


def _size(records: RecordDict) -> int:
    n = sum(a.numpy().nbytes for r in records.array_records.values() for a in r.values())
    for r in records.config_records.values():
        n += sum(len(v) for v in r.values() if isinstance(v, bytes | str))
    return n


def _send(grid, nodes, kind, content, *, rnd, timeout, names, counter) -> dict[int, Message]:
    """``content(node)`` to every node; the usable replies by node (others → counter)."""
    sent = []
    for node in nodes:
        body = content(node)
        counter["down"] += _size(body)
        sent.append(Message(content=body, dst_node_id=node, message_type=kind, group_id=str(rnd)))
    replies = exchange(grid, sent, timeout=timeout)
    usable, dropped = screen_replies(sent, replies, None, names)
    counter["dropped"] += [f"{d} ({kind.split('_')[-1].split('.')[-1]})" for d in dropped]
    out = {}
    for msg in usable:
        counter["up"] += _size(msg.content)
        out[msg.metadata.src_node_id] = msg
    return out


def secure_round(
    grid,
    nodes: list[int],
    *,
    rnd: int,
    config: ConfigRecord,
    global_state: dict[str, torch.Tensor],
    clip: float,
    timeout: float,
    names: dict[int, str],
) -> SecureRound:
    """One training round of the sites in ``nodes`` whose aggregate is computed under
    secure aggregation; the new global weights are global + the sample-weighted mean update."""
    agg = Aggregator(clip=clip, threshold=threshold(len(nodes)))
    count: dict = {"up": 0, "down": 0, "dropped": []}
    seconds: dict[str, float] = {}
    kw = {"rnd": rnd, "timeout": timeout, "names": names, "counter": count}

    def stage(name):
        seconds[name] = time.perf_counter()
        return name

    try:
        stage("keys")
        got = _send(grid, nodes, SETUP, lambda n: RecordDict({SECAGG: ConfigRecord({})}), **kw)
        agg.keys(
            {n: (m.content[SECAGG]["enc-public"], m.content[SECAGG]["mask-public"])
             for n, m in got.items()}
        )  # fmt: skip
        publics = {f"enc-{n}": k[0] for n, k in agg.publics.items()}
        publics |= {f"mask-{n}": k[1] for n, k in agg.publics.items()}
        listing = {"participants": ids(agg.publics), "threshold": agg.threshold, **publics}
        stage("share")
        got = _send(
            grid, list(agg.publics), SHARE, lambda n: RecordDict({SECAGG: ConfigRecord(listing)}),
            **kw,
        )  # fmt: skip
        inboxes = agg.route(
            {n: {int(k[3:]): v for k, v in m.content[SECAGG].items() if k.startswith("to-")}
             for n, m in got.items()}
        )  # fmt: skip
        stage("train")
        weights = ArrayRecord({P.WEIGHTS: Array(pack(global_state))})

        def train_content(n):
            inbox = {f"from-{i}": c for i, c in inboxes[n].items()}
            return RecordDict({
                P.ARRAYS: weights, P.CONFIG: config,
                SECAGG: ConfigRecord({"participants": ids(agg.sharers), "clip": clip, **inbox}),
            })  # fmt: skip

        trained = _send(grid, agg.sharers, TRAIN, train_content, **kw)
        size = int(pack(global_state).size)
        masked = {}
        for n, m in trained.items():
            vec = m.content[P.ARRAYS][P.WEIGHTS].numpy()
            if vec.dtype != np.uint64 or vec.shape != (size,):
                count["dropped"].append(f"{names.get(n, n)}: masked update of the wrong shape")
                continue
            masked[n] = (vec, int(m.content[P.METRICS][P.NUM_EXAMPLES]))
        alive, lost = agg.survivors(masked)
        stage("unmask")
        request = ConfigRecord({"survivors": ids(alive), "dropped": ids(lost)})
        got = _send(grid, alive, UNMASK, lambda n: RecordDict({SECAGG: request}), **kw)
        shares = {n: dict(m.content[SECAGG]) for n, m in got.items()}
        mean, weight_sum = agg.unmask(masked, shares)
    except S.SecAggError as e:
        why = "; ".join(count["dropped"])
        raise QuorumError(
            f"round {rnd}: secure aggregation stopped: {e}" + (f" ({why})" if why else "")
        ) from None
    seconds["end"] = time.perf_counter()
    marks = list(seconds.items())
    timing = {a: round(t2 - t1, 3) for (a, t1), (_, t2) in zip(marks, marks[1:], strict=False)}
    reference = dict(global_state)
    new = unpack((pack(global_state).astype(np.float64) + mean).astype(np.float32), reference)
    usable = sorted((trained[n] for n in alive), key=site_name)  # as screen_replies
    metrics = aggregate_metricrecords([m.content for m in usable], P.NUM_EXAMPLES)
    clipped = sum(int(trained[n].content[P.METRICS].get("secagg-clipped", 0)) for n in alive)
    return SecureRound(
        state=new,
        usable=usable,
        dropped=count["dropped"],
        metrics=metrics,
        info={
            "sites": len(alive),
            "dropped_after_sharing": len(lost),
            "threshold": agg.threshold,
            "clip": clip,
            "clipped_values": clipped,
            "samples": weight_sum,
            "bytes_to_sites": count["down"],
            "bytes_from_sites": count["up"],
            "seconds": timing,
        },
    )
