"""Server momentum (FedAvgM): two rounds of given site updates give the closed form."""

import time

import pytest
import torch
from flwr.app import Message, Metadata, MetricRecord, RecordDict

from fedbridge_server.config import FederationConfig
from fedbridge_server.strategy import (
    build_strategy,
    record_state,
    restore_strategy_state,
    state_record,
    strategy_state,
)
from fedbridge_shared import protocol as P
from fedbridge_shared.errors import ConfigError

W0 = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
ROUNDS = [  # per round: (site weights, num-examples) of two sites
    [([0.0, 0.0], 1), ([2.0, 4.0], 3)],  # weighted mean (1.5, 3.0)
    [([1.0, 1.0], 1), ([1.0, 3.0], 3)],  # weighted mean (1.0, 2.5)
]


def _reply(weights: list[float], n: int, node: int) -> Message:
    content = RecordDict({
        P.ARRAYS: state_record({"w": torch.tensor(weights, dtype=torch.float64)}),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: n}),
    })  # fmt: skip
    metadata = Metadata(
        run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
        reply_to_message_id=f"m{node}", group_id="1", created_at=time.time(), ttl=3600.0,
        message_type="train",
    )  # fmt: skip
    return Message(content=content, metadata=metadata)


def _round(strategy, rnd: int, global_state: dict) -> dict:
    strategy.current = state_record(global_state)[P.WEIGHTS].numpy()  # what configure_train does
    replies = [_reply(w, n, node) for node, (w, n) in enumerate(ROUNDS[rnd - 1], start=1)]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return record_state(arrays, W0)


def _cfg(**flat) -> FederationConfig:
    return FederationConfig.from_flat({"strategy": "fedavgm", **flat})


def test_two_rounds_of_server_momentum_give_the_closed_form():
    # η = 0.5, β = 0.9. Round 1: Δ1 = w0 − m1 = (−0.5, −1), v1 = Δ1, w1 = w0 − η·v1 = (1.25, 2.5).
    # Round 2: Δ2 = w1 − m2 = (0.25, 0), v2 = β·v1 + Δ2 = (−0.2, −0.9), w2 = w1 − η·v2.
    strategy = build_strategy(_cfg(**{"fedavgm.server-lr": 0.5, "fedavgm.momentum": 0.9}))
    w1 = _round(strategy, 1, W0)
    assert torch.allclose(w1["w"], torch.tensor([1.25, 2.5], dtype=torch.float64))
    w2 = _round(strategy, 2, w1)
    assert torch.allclose(w2["w"], torch.tensor([1.35, 2.95], dtype=torch.float64))


def test_without_momentum_at_server_lr_1_it_is_fedavg():
    strategy = build_strategy(_cfg())  # defaults: server-lr 1, momentum 0
    w2 = _round(strategy, 2, _round(strategy, 1, W0))
    assert torch.allclose(w2["w"], torch.tensor([1.0, 2.5], dtype=torch.float64))


def test_the_velocity_survives_a_resume():
    cfg = _cfg(**{"fedavgm.server-lr": 0.5, "fedavgm.momentum": 0.9})
    first = build_strategy(cfg)
    w1 = _round(first, 1, W0)
    saved = strategy_state(first)
    assert list(saved) == ["momentum_vector/0"]
    resumed = build_strategy(cfg)
    restore_strategy_state(resumed, saved)
    w2 = _round(resumed, 2, w1)
    assert torch.allclose(w2["w"], torch.tensor([1.35, 2.95], dtype=torch.float64))


@pytest.mark.parametrize(
    "flat, needle",
    [
        ({"fedavgm.momentum": 1.0}, "'fedavgm.momentum' (1.0)"),
        ({"fedavgm.server-lr": 0}, "'fedavgm.server-lr' (0.0)"),
        ({"dp.enabled": True}, "not fedadam or fedavgm"),
    ],
)
def test_bad_fedavgm_settings_are_refused(flat, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _cfg(**flat)
