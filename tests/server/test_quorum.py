"""Bounded waits for sites: the deadline always ends the wait, the quorum decides what next."""

from types import SimpleNamespace

import pytest

from fedbridge_server.config import FederationConfig
from fedbridge_server.quorum import QuorumError, SnapshotGrid, exchange, wait_for_sites
from fedbridge_shared.errors import ConfigError


class Clock:
    """A fake monotonic clock advanced by the fake sleep, so no test waits for real."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Grid:
    """Nodes that connect at given (fake) times and leave at others."""

    def __init__(self, clock: Clock, arrivals: dict[int, float], leaves: dict[int, float]):
        self.clock, self.arrivals, self.leaves = clock, arrivals, leaves
        self.calls = 0

    def get_node_ids(self):
        self.calls += 1
        t = self.clock()
        return [n for n, at in self.arrivals.items() if at <= t < self.leaves.get(n, 1e9)]


class Mailbox:
    """Replies that arrive at given (fake) times after their messages were pushed."""

    def __init__(self, clock: Clock, delays: dict[str, float]) -> None:
        self.clock, self.delays, self.pulls = clock, delays, 0

    def push_messages(self, messages):
        self.sent_at = self.clock()
        return [m.id for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        late = self.clock() - self.sent_at
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
            for i in ids
            if self.delays.get(i, 1e9) <= late
        ]


def _exchange(box, clock, names, timeout):
    messages = [SimpleNamespace(id=n) for n in names]
    got = exchange(box, messages, timeout=timeout, clock=clock, sleep=clock.sleep)
    return sorted(m.metadata.reply_to_message_id for m in got)


def test_exchange_returns_once_every_reply_came_polling_every_half_second():
    clock = Clock()
    box = Mailbox(clock, {"a": 0.2, "b": 1.9})
    assert _exchange(box, clock, ["a", "b"], timeout=300) == ["a", "b"]
    assert clock.now == 2.0 and box.pulls == 5  # 0, 0.5, 1, 1.5, 2 s: not Flower's 3 s


def test_exchange_ends_at_its_timeout_with_the_replies_it_has():
    clock = Clock()
    box = Mailbox(clock, {"a": 1.0})  # "b" never answers (a site lost mid-round)
    assert _exchange(box, clock, ["a", "b"], timeout=10) == ["a"]
    assert clock.now == 10.0


def _wait(grid, clock, **kwargs):
    return wait_for_sites(grid, clock=clock, sleep=clock.sleep, what="round 1 training", **kwargs)


def test_returns_as_soon_as_every_expected_site_is_connected():
    clock = Clock()
    grid = Grid(clock, {1: 0, 2: 3, 3: 7}, {})
    assert _wait(grid, clock, expected=3, quorum=2, timeout=100) == [1, 2, 3]
    assert clock.now == 7


def test_at_the_deadline_a_quorum_goes_on_without_the_missing_site():
    clock = Clock()
    grid = Grid(clock, {1: 0, 2: 0, 3: 0}, {3: 0})  # site 3 was lost before the round
    assert _wait(grid, clock, expected=3, quorum=2, timeout=30) == [1, 2]
    assert clock.now == 30


def test_below_the_quorum_at_the_deadline_the_run_stops_naming_the_counts():
    clock = Clock()
    grid = Grid(clock, {1: 0}, {})
    needle = r"round 1 training: 1 of 3 expected sites .* quorum of 2"
    with pytest.raises(QuorumError, match=needle):
        _wait(grid, clock, expected=3, quorum=2, timeout=60)
    assert clock.now == 60 and grid.calls == 61  # polled once a second, then stopped


def test_the_snapshot_is_what_the_strategy_samples_from(monkeypatch):
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # messages are built inside a run
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    from fedbridge_server.strategy import build_strategy

    clock = Clock()
    real = Grid(clock, {1: 0, 2: 0, 3: 0}, {})
    strategy = build_strategy(FederationConfig(min_available_sites=3, min_train_sites=2))
    # the strategy would wait forever for a third node; with the snapshot it samples the two
    sent = list(
        strategy.configure_train(1, ArrayRecord({}), ConfigRecord({}), SnapshotGrid(real, [1, 3]))
    )
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 3]


@pytest.mark.parametrize(
    "flat, needle",
    [
        ({"min-available-sites": 2, "min-train-sites": 3}, "'min-train-sites' (3): the quorum"),
        ({"min-train-sites": 0}, "'min-train-sites' (0)"),
        ({"min-evaluate-sites": 5}, "'min-evaluate-sites' (5)"),
        ({"join-timeout": 0}, "'join-timeout' (0"),
        ({"site-wait-timeout": -1}, "'site-wait-timeout' (-1"),
    ],
)
def test_quorum_settings_are_checked(flat, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        FederationConfig.from_flat(flat)
