"""Flower strategies from the run config, their resumable state, and screening of site replies."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedbridge_server.config import FederationConfig
from fedbridge_server.server_opt import AdamStep, MomentumStep, ServerOptStrategy
from fedbridge_shared import protocol as P
from fedbridge_shared.weights import WeightsError, pack, unpack

log = logging.getLogger("fedbridge.server")


def state_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """The ``arrays`` record of a message: the weights packed into one array."""
    return ArrayRecord({P.WEIGHTS: Array(pack(state))})


def record_state(record: ArrayRecord, reference: dict[str, torch.Tensor]) -> dict:
    """The state dict an ``arrays`` record holds, checked against ``reference``'s layout
    (WeightsError naming what does not fit, or the layer with NaN/Inf)."""
    if list(record.keys()) != [P.WEIGHTS]:
        raise WeightsError(f"expected one packed array {P.WEIGHTS!r}, got {list(record)[:3]}")
    return unpack(record[P.WEIGHTS].numpy(), reference)


def build_strategy(cfg: FederationConfig) -> Strategy:
    """FedAvg, FedProx, FedAdam or FedAvgM."""
    # The waits and the quorum are fedbridge's (quorum.py): the strategy samples from the
    # snapshot of connected nodes it is given and never waits itself.
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": 1,
    }
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.local.proximal_mu)
    if cfg.strategy == "fedadam":
        a = cfg.fedadam
        adam = AdamStep(eta=a.eta, beta_1=a.beta_1, beta_2=a.beta_2, tau=a.tau)
        return ServerOptStrategy(adam, **common)
    if cfg.strategy == "fedavgm":
        m = cfg.fedavgm
        return ServerOptStrategy(MomentumStep(lr=m.server_lr, momentum=m.momentum), **common)
    return FedAvg(**common)  # with dp.enabled the round loop aggregates privately (privacy.py)


# Checkpoint keys: "<moment>/<record key>", as fedbridge's FedAdam/FedAvgM state was saved
# before (m_t/weights, v_t/weights, momentum_vector/0), so older round stores resume.
_KEYS = {
    "m_t": f"m_t/{P.WEIGHTS}",
    "v_t": f"v_t/{P.WEIGHTS}",
    "momentum_vector": "momentum_vector/0",
}


def strategy_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    """The server optimizer's state (FedAdam's moments, FedAvgM's velocity), for safetensors."""
    if not isinstance(strategy, ServerOptStrategy):
        return {}
    return {_KEYS[k]: torch.from_numpy(np.array(v)) for k, v in strategy.step.state.items()}


def restore_strategy_state(strategy: Strategy, saved: dict[str, torch.Tensor]) -> None:
    """Put :func:`strategy_state`'s tensors back (a resumed run goes on with its moments)."""
    if isinstance(strategy, ServerOptStrategy):
        state = {k: saved[key].numpy() for k, key in _KEYS.items() if key in saved}
        strategy.step.state = state


def site_label(node_id: int, names: dict[int, str]) -> str:
    """A site's name; one that never answered is "an unnamed site" (node id in brackets)."""
    return names.get(node_id) or f"unnamed site (node {node_id})"


def site_name(msg: Message) -> str:
    """The name a site reports when it fits
    :data:`~fedbridge_shared.protocol.SITE_NAME_PATTERN` (never a path), else a label with its
    node id."""
    if msg.has_content() and P.SITE in msg.content.config_records:
        name = msg.content.config_records[P.SITE].get(P.SITE_NAME)
        if isinstance(name, str) and P.SITE_NAME_PATTERN.fullmatch(name):
            return name
    return site_label(msg.metadata.src_node_id, {})


_LOST = {  # errors the SuperLink writes for a site, in words (Flower's name a "node")
    ErrorCode.NODE_UNAVAILABLE: "lost (stopped answering the coordinator's heartbeat)",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "lost (its reply expired)",
    ErrorCode.MESSAGE_UNAVAILABLE: "lost (the task expired before it answered)",
}


def _failure(error) -> str:
    """A dropped site's reason: Flower's expiries in words, else fedbridge's code and count
    (:func:`~fedbridge_shared.protocol.describe_failure`; nothing else a site sent is shown)."""
    return _LOST.get(error.code) or f"failed ({P.describe_failure(error.reason)})"


def schema_problem(msg: Message) -> str | None:
    """Why a site's reply is not fedbridge's closed schema (see ``protocol.reply_problem``)."""
    content = msg.content
    records: dict[str, dict] = {}
    for key, record in content.items():
        if key in content.array_records:
            records[key] = {name: None for name in record}
        else:
            records[key] = dict(record)
    return P.reply_problem(msg.metadata.message_type, records)


def screen_replies(
    sent: Iterable[Message],
    replies: Iterable[Message],
    reference: dict[str, torch.Tensor] | None,
    names: dict[int, str],
) -> tuple[list[Message], list[str]]:
    """Usable replies (sorted by site, so aggregation is reproducible) and why others dropped.

    A reply is dropped when the site failed, did not answer in time, or (with ``reference``)
    sent weights that are missing, mis-shaped or not finite: one bad site cannot poison the
    global model.
    """
    sent, replies = list(sent), list(replies)
    # An error reply made by the SuperLink (e.g. "Node Unavailable") does not come from the
    # site's node: match replies to what was sent, so the site is named once, correctly.
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}

    def origin(m: Message) -> int:
        return dst.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)

    answered = {origin(m) for m in replies}
    dropped = [
        f"{site_label(m.metadata.dst_node_id, names)}: no reply before the round timeout"
        for m in sent
        if m.metadata.dst_node_id not in answered
    ]
    usable = []
    for msg in replies:
        who = names.get(origin(msg)) or (
            site_name(msg) if msg.has_content() else site_label(origin(msg), names)
        )
        if msg.has_error():  # only Flower's expiries or a code and a count are shown
            dropped.append(f"{who}: {_failure(msg.error)}")
            continue
        problem = schema_problem(msg)
        if problem is not None:
            dropped.append(f"{who}: reply rejected (not fedbridge's schema: {problem})")
            continue
        names[msg.metadata.src_node_id] = site_name(msg)
        bad = _non_finite_metric(msg)
        if bad:
            dropped.append(f"{who}: reply rejected (metric {bad})")
            continue
        if reference is not None:
            try:
                (record,) = msg.content.array_records.values()
                record_state(record, reference)
            except (WeightsError, ValueError) as e:
                dropped.append(f"{who}: update rejected ({e})")
                continue
        usable.append(msg)
    for reason in dropped:
        log.warning("site dropped: %s", reason)
    return sorted(usable, key=site_name), dropped


def _non_finite_metric(msg: Message) -> str | None:
    """``"train_loss is nan"`` for the first NaN/Inf metric a site reported, else None."""
    for record in msg.content.metric_records.values():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                return f"{key} is {value}"
    return None
