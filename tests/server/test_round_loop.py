"""The coordinator's round loop on a fake Flower Grid and a fake clock: lost sites, timeouts,
the quorum, resume and a stop request, with no test waiting for a real timeout.

The sites are fakes (they answer with the weights they got and made-up metrics); the loop,
the strategy, the screening, the checkpoints and the final bundle are the real ones, on a
real (tiny, ImageNet-free) ``test_efficientnet`` bundle.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from rich.console import Console

from fedbridge_server.best import choose_best
from fedbridge_server.config import FederationConfig
from fedbridge_server.federation import run_federation
from fedbridge_server.quorum import QuorumError, Stopped
from fedbridge_server.round_loop import Clock, wait_timeout
from fedbridge_shared import protocol as P
from fedbridge_shared import rounds as R
from fedbridge_shared.models import init_model
from fedbridge_shared.spec import load_bundle, save_bundle

LABELS = ("CNV", "DME", "DRUSEN", "NORMAL")
JOIN, SITE_WAIT, ROUND = 1800.0, 60.0, 300.0
INF = float("inf")


@pytest.fixture(autouse=True)
def _inside_a_run(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # messages are built inside a run
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory) -> Path:
    model, spec = init_model("none", LABELS, "test_efficientnet", 32)
    return save_bundle(tmp_path_factory.mktemp("bridge") / "bridge", spec, model.state_dict())


class FakeClock(Clock):
    """Fake monotonic time that only the loop's sleeps advance."""

    def __init__(self) -> None:
        super().__init__(now=lambda: self.t, sleep=self._sleep)
        self.t = 0.0

    def _sleep(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class FakeSite:
    """A site: connected from ``joins`` to ``leaves`` (fake seconds), answering after ``delay``.

    ``leave_after=(round, kind)`` leaves once it answered that message; ``silent_from=(round,
    kind)`` takes that message and never answers, leaving; ``fail`` answers with Flower's
    error text; ``on_task`` is called with each (round, kind) it receives.
    """

    name: str
    node: int
    joins: float = 0.0
    leaves: float = INF
    delay: float = 2.0
    leave_after: tuple[int, str] | None = None
    silent_from: tuple[int, str] | None = None
    fail: str | None = None
    on_task: object = None
    val_loss: object = None  # round → this site's validation loss (default 0.7)
    val_examples: int = 40  # three sites: 120 validation images, enough to rank rounds
    got: list = field(default_factory=list)


class FakeGrid:
    """Flower's Grid as the round loop uses it: node ids, push, pull."""

    def __init__(self, clock: FakeClock, sites: list[FakeSite]) -> None:
        self.clock, self.sites = clock, {s.node: s for s in sites}
        self.pending: dict[str, tuple[Message, float]] = {}
        self.count = 0

    def get_node_ids(self) -> list[int]:
        t = self.clock.t
        return [s.node for s in self.sites.values() if s.joins <= t < s.leaves]

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.count}"
            site = self.sites[msg.metadata.dst_node_id]
            task = (int(msg.content[P.CONFIG][P.SERVER_ROUND]), msg.metadata.message_type)
            site.got.append(task)
            if callable(site.on_task):
                site.on_task(task)
            if site.silent_from and task >= site.silent_from:
                site.leaves = min(site.leaves, self.clock.t)
            elif site.leaves > self.clock.t:  # a site gone before the push never sees it
                self.pending[msg.metadata.message_id] = (msg, self.clock.t + site.delay)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        out = []
        for mid in list(ids):
            msg, due = self.pending.get(mid, (None, INF))
            if msg is None or due > self.clock.t:
                continue
            del self.pending[mid]
            site = self.sites[msg.metadata.dst_node_id]
            out.append(self._reply(site, msg))
            task = (int(msg.content[P.CONFIG][P.SERVER_ROUND]), msg.metadata.message_type)
            if site.leave_after == task:
                site.leaves = self.clock.t
        return out

    @staticmethod
    def _reply(site: FakeSite, msg: Message) -> Message:
        if site.fail == "heartbeat":  # what the SuperLink writes for a site gone silent
            reason = "Error: Node Unavailable — The destination node failed to report a heartbeat"
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason), reply_to=msg)
        if site.fail:  # as Flower wraps a ClientApp's SiteError of fedbridge's closed schema
            reason = f"<class 'fedbridge_client.client_app.SiteError'>:<'{site.fail}'>"
            return Message(Error(code=0, reason=reason), reply_to=msg)
        counts = (5, 4, 0, 3)  # this site has no DRUSEN images
        if msg.metadata.message_type == "train":
            reply = P.TrainReply(num_examples=12, class_counts=counts, train_loss=0.5)
            content = {P.ARRAYS: msg.content[P.ARRAYS]}  # trained: the weights it got
        else:
            rnd = int(msg.content[P.CONFIG][P.SERVER_ROUND])
            loss = site.val_loss(rnd) if callable(site.val_loss) else 0.7
            reply = P.EvalReply(
                num_examples=site.val_examples, class_counts=counts, val_loss=loss,
                val_accuracy=0.5, class_correct=(3, 2, 0, 1),
            )  # fmt: skip
            content = {}
        content[P.METRICS] = MetricRecord(reply.to_metrics())
        content[P.SITE] = ConfigRecord({P.SITE_NAME: site.name})
        return Message(RecordDict(content), reply_to=msg)


def _cfg(bridge: Path, out: Path, **kw) -> FederationConfig:
    settings = dict(
        init=str(bridge), out=str(out), num_server_rounds=3, min_available_sites=3,
        min_train_sites=2, min_evaluate_sites=1, join_timeout=JOIN,
        site_wait_timeout=SITE_WAIT, round_timeout=ROUND,
    )  # fmt: skip
    return FederationConfig(**{**settings, **kw})


def _sites(**changes) -> list[FakeSite]:
    return [FakeSite(n, 100 + i, **changes.get(n, {})) for i, n in enumerate(("a", "b", "c"))]


def _run(bridge, out, sites, clock=None, **kw):
    clock = clock or FakeClock()
    console = Console(file=io.StringIO(), width=300, color_system=None)
    summary = run_federation(FakeGrid(clock, sites), _cfg(bridge, out, **kw), console, clock)
    return summary, clock, console.file.getvalue()


def _state(out: Path) -> dict:
    return json.loads((out.with_name(out.name + "-rounds") / "state.json").read_text())


def test_only_the_first_round_waits_the_join_timeout():
    cfg = FederationConfig(join_timeout=JOIN, site_wait_timeout=SITE_WAIT, round_timeout=ROUND)
    assert [wait_timeout(cfg, r, first_round=1) for r in (1, 2, 3)] == [JOIN, SITE_WAIT, SITE_WAIT]
    assert wait_timeout(cfg, 3, first_round=3) == JOIN  # the first round after a resume
    short = FederationConfig(site_wait_timeout=90, round_timeout=30)
    assert wait_timeout(short, 2, first_round=1) == 30  # never longer than a round


def test_all_sites_present_three_rounds_without_waiting(bridge, tmp_path):
    summary, clock, text = _run(bridge, tmp_path / "fed", _sites())
    assert [h["round"] for h in summary["history"]] == [1, 2, 3]
    assert all(h["sites"] == ["a", "b", "c"] and not h["dropped"] for h in summary["history"])
    for h in summary["history"]:  # the loop writes the keys R.RoundRow names, no other
        assert set(h) <= R.KEYS, set(h) - R.KEYS
        assert {R.ROUND, R.SITES, R.PER_SITE, R.SCORE} <= set(h)
    assert clock.t < 3 * 2 * 3  # three rounds of two 2-s exchanges (+ the half-second polls)
    per_site = summary["history"][0]["per_site"]["a"]
    assert per_site["train_counts"] == {"CNV": 5, "DME": 4, "DRUSEN": 0, "NORMAL": 3}
    assert _state(tmp_path / "fed")["names"] == {"100": "a", "101": "b", "102": "c"}
    assert load_bundle(tmp_path / "fed").spec.labels == LABELS


def test_a_site_lost_after_round_1_costs_one_site_wait_not_the_join_timeout(bridge, tmp_path):
    sites = _sites(c={"leave_after": (1, "evaluate")})
    summary, clock, text = _run(bridge, tmp_path / "fed", sites)
    rounds = summary["history"]
    assert [h["sites"] for h in rounds] == [["a", "b", "c"], ["a", "b"], ["a", "b"]]
    # round 2 waits site-wait-timeout once for "c", then goes on with the quorum; round 3
    # does not wait for it again; before the fix both waited the join timeout (1800 s each)
    assert SITE_WAIT <= rounds[1]["seconds"] < SITE_WAIT + 10
    assert rounds[2]["seconds"] < 10
    assert clock.t < SITE_WAIT + 30
    assert sites[2].got == [(1, "train"), (1, "evaluate")]
    waiting = "round 2 training: waiting for 1 more site(s) (last seen: c); connected 2 of 3: a, b"
    assert waiting in text
    assert "round 2 training: going on with 2 of 3 sites (a, b) after 60 s" in text


def test_a_site_dropping_mid_round_is_named_and_the_run_goes_on(bridge, tmp_path):
    sites = _sites(b={"silent_from": (2, "train")})
    summary, clock, text = _run(bridge, tmp_path / "fed", sites)
    rounds = summary["history"]
    assert rounds[1]["sites"] == ["a", "c"]
    assert rounds[1]["dropped"] == ["b: no reply before the round timeout"]
    assert rounds[2]["sites"] == ["a", "c"] and not rounds[2]["dropped"]
    # round 2: the round timeout for b's update, one site wait before evaluation; round 3: none
    assert ROUND + SITE_WAIT <= rounds[1]["seconds"] < ROUND + SITE_WAIT + 10
    assert rounds[2]["seconds"] < 10
    assert "dropped: b: no reply before the round timeout" in text


def test_a_failing_site_is_named_without_python_class_text(bridge, tmp_path):
    wire = P.SiteFailure("DOE_JOHN.png unreadable", code=P.SiteErrorCode.UNREADABLE_IMAGES).wire()
    summary, _, _ = _run(bridge, tmp_path / "fed", _sites(c={"fail": wire}))
    dropped = summary["history"][0]["dropped"]
    assert dropped[0] == "unnamed site (node 102): failed (unreadable_images: 1)"
    assert not any("<class" in d for h in summary["history"] for d in h["dropped"])
    summary, _, _ = _run(bridge, tmp_path / "fed2", _sites(c={"fail": "free text DOE_JOHN"}))
    dropped = summary["history"][0]["dropped"]  # text outside the schema is never shown
    assert "DOE_JOHN" not in dropped[0] and "not in fedbridge's schema" in dropped[0]


def test_the_first_round_waits_the_join_timeout_then_goes_on_with_the_quorum(bridge, tmp_path):
    sites = _sites(c={"joins": INF})  # "c" never comes
    summary, clock, text = _run(bridge, tmp_path / "fed", sites)
    rounds = summary["history"]
    assert JOIN <= rounds[0]["seconds"] < JOIN + 10
    assert rounds[1]["seconds"] < SITE_WAIT + 10 and rounds[2]["seconds"] < 10
    waits = [ln for ln in text.splitlines() if ln.startswith("round 1 training: waiting")]
    # printed as the wait starts and every 30 s: which sites, and how long until the quorum
    assert len(waits) == JOIN / 30
    assert waits[0].endswith(
        "connected 2 of 3: 2 not named yet; going on with the quorum in 1800 s (wait 1800 s)"
    )


def test_a_late_site_is_admitted_at_the_next_round_it_is_connected_for(bridge, tmp_path):
    sites = _sites(c={"joins": JOIN + 3})  # c comes while round 1 goes on without it
    summary, _, _ = _run(bridge, tmp_path / "fed", sites)
    assert [h["sites"] for h in summary["history"]] == [["a", "b"], *[["a", "b", "c"]] * 2]
    assert sites[2].got[0] == (2, "train")


def test_below_the_quorum_the_run_stops_resumable_and_resumes(bridge, tmp_path):
    out = tmp_path / "fed"
    sites = _sites(b={"leave_after": (1, "evaluate")}, c={"leave_after": (1, "evaluate")})
    with pytest.raises(QuorumError, match=r"round 2 training: 1 of 3 .* after 60 s") as e:
        _run(bridge, out, sites)
    assert _state(out)["completed"] == 1
    # resumed later: the sites come back after 100 s, within the first round's join timeout
    summary, clock, text = _run(bridge, out, _sites(b={"joins": 100}, c={"joins": 100}))
    assert "resuming after round 1" in text
    assert [h["round"] for h in summary["history"]] == [1, 2, 3]
    assert 100 <= summary["history"][1]["seconds"] < 110
    assert _state(out)["completed"] == 3
    assert "Rounds up to 1 are saved" in str(e.value)


def test_a_stop_request_ends_the_run_at_once_keeping_the_completed_rounds(bridge, tmp_path):
    out = tmp_path / "fed"
    clock = FakeClock()

    def stop_in_round_2(task):
        if task == (2, "train"):
            clock.stop.set()  # what the SIGTERM handler does

    sites = _sites(a={"on_task": stop_in_round_2})
    with pytest.raises(Stopped, match="stopped on request in round 2. Rounds up to 1 are saved"):
        _run(bridge, out, sites, clock=clock)
    stopped_at = clock.t
    assert stopped_at < 10  # not after the round timeout: at the next half-second poll
    assert _state(out)["completed"] == 1
    assert not (out.with_name("fed-rounds") / "round-0002").exists() and not out.exists()


def _losses(by_round: dict[int, float]):
    return lambda rnd: by_round[rnd]


def test_the_best_round_is_chosen_among_rounds_evaluated_by_every_site(bridge, tmp_path):
    # c, whose patients are hard, is lost after round 1: rounds 2 and 3 average over a and b
    # only, so their lower mean loss is on another denominator and must not win
    easy = {"val_loss": _losses({1: 0.5, 2: 0.45, 3: 0.4})}
    sites = _sites(
        a=easy, b=easy, c={"val_loss": _losses({1: 1.5}), "leave_after": (1, "evaluate")}
    )
    summary, _, text = _run(bridge, tmp_path / "fed", sites)
    rounds = summary["history"]
    assert [r["federated_val_loss"] for r in rounds] == pytest.approx([2.5 / 3, 0.45, 0.4])
    assert summary["best_round"] == 1
    state = _state(tmp_path / "fed")
    assert (state["best_round"], state["best_rule"]) == (1, "same-sites")
    training = load_bundle(tmp_path / "fed").training
    assert training["best_round"] == 1 and training["best_round_rule"] == "same-sites"
    assert "best round 1 (lowest federated validation loss among rounds evaluated by every" in text
    # with every site in every round, the lowest loss wins
    sites = _sites(a=easy, b=easy, c={"val_loss": _losses({1: 1.5, 2: 1.2, 3: 1.3})})
    summary, _, _ = _run(bridge, tmp_path / "all", sites)
    assert summary["best_round"] == 2
    assert _state(tmp_path / "all")["best_rule"] == "same-sites"


def test_the_coordinators_validation_set_chooses_the_best_round(bridge, oct_root, tmp_path):
    val = tmp_path / "val"
    for label in LABELS:
        (val / label).mkdir(parents=True)
        for img in sorted((oct_root / label).iterdir())[:25]:  # 100 images: enough to rank
            (val / label / img.name).symlink_to(img)
    easy = {"val_loss": _losses({1: 0.9, 2: 0.1, 3: 0.5})}  # the sites' say does not count
    summary, _, text = _run(bridge, tmp_path / "fed", _sites(a=easy), val_data=str(val))
    rounds = summary["history"]
    assert all(r["server_val_loss"] > 0 for r in rounds)
    assert all(set(r) <= R.KEYS for r in rounds)  # the server_val_* keys included
    best = min(rounds, key=lambda r: r["server_val_loss"])["round"]
    state = _state(tmp_path / "fed")
    assert (state["best_round"], state["best_rule"]) == (best, "server-val")
    assert state["best_score"] == pytest.approx(rounds[best - 1]["server_val_loss"])
    assert load_bundle(tmp_path / "fed").training["best_round_rule"] == "server-val"
    assert "lowest loss on the coordinator's validation set (--val-data)" in text


def test_a_handful_of_validation_images_ships_the_last_round_not_the_least_trained(
    bridge, tmp_path
):
    # issue #29's regression: 7 + 8 + 5 validation images, the loss rising as the model grows
    # confident while accuracy stays put: the lowest loss would ship round 1
    rising = _losses({1: 0.9, 2: 1.0, 3: 1.1})
    sizes = {"a": 7, "b": 8, "c": 5}
    sites = _sites(**{n: {"val_loss": rising, "val_examples": k} for n, k in sizes.items()})
    summary, _, text = _run(bridge, tmp_path / "fed", sites)
    state = _state(tmp_path / "fed")
    assert (summary["best_round"], state["best_rule"]) == (3, "small-val")
    assert "fewer than 100 validation images cannot rank rounds" in text
    assert load_bundle(tmp_path / "fed").training["best_round"] == 3
    # the same losses on 120 images: the lowest loss is a real signal and wins
    sites = _sites(**{n: {"val_loss": rising} for n in sizes})
    summary, _, _ = _run(bridge, tmp_path / "big", sites)
    assert summary["best_round"] == 1 and _state(tmp_path / "big")["best_rule"] == "same-sites"


def test_choose_best_needs_enough_images_on_the_set_it_ranks():
    small = [{**_row(r, a=loss), "server_val_loss": loss, "server_val_examples": 12}
             for r, loss in ((1, 0.2), (2, 0.5))]  # fmt: skip
    assert choose_best(small) == (2, None, "small-val")
    big = [{**row, "server_val_examples": 100} for row in small]
    assert choose_best(big) == (1, 0.2, "server-val")
    older = [{k: v for k, v in row.items() if k != "server_val_examples"} for row in small]
    assert choose_best(older) == (1, 0.2, "server-val")  # a store written before the size key


def _row(rnd: int, **sites: float) -> dict:
    per = {n: {"val_examples": 100, "val_loss": loss} for n, loss in sites.items()}
    return {"round": rnd, "per_site": per, "federated_val_loss": sum(sites.values()) / len(sites)}


def test_choose_best_rescores_over_the_common_sites_when_no_round_had_them_all():
    history = [_row(1, a=0.2, b=0.9), _row(2, a=0.5, c=0.1), _row(3, a=0.3, b=0.1)]
    assert choose_best(history) == (1, 0.2, "common-sites")  # a alone: 0.2, 0.5, 0.3
    assert choose_best(history, available=lambda r: r != 1) == (3, 0.3, "common-sites")
    assert choose_best([{"round": 1, "per_site": {}}, {"round": 2}]) == (2, None, "last-round")


def test_a_site_lost_by_the_superlink_is_named_in_words_not_as_a_node(bridge, tmp_path):
    summary, _, _ = _run(bridge, tmp_path / "fed", _sites(c={"fail": "heartbeat"}))
    dropped = summary["history"][0]["dropped"]
    assert dropped[0] == (
        "unnamed site (node 102): lost (stopped answering the coordinator's heartbeat)"
    )
