"""One federated round after another: wait for sites → train → screen → aggregate → evaluate →
checkpoint. Built by :func:`fedbridge_server.federation.run_federation`; unit-tested with a fake
Grid and a fake clock (``tests/server/test_round_loop.py``), so no test waits for real.

Waits: only the run's first round (the first after a resume included) waits ``join-timeout``
for the expected sites; every later wait is at most ``site-wait-timeout`` (never more than
``round-timeout``), and a site missing at such a deadline is not waited for again until it is
back (a restarted site is taken in at the next round it is connected for).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from rich.console import Console
from rich.markup import escape
from torch.utils.data import DataLoader

from fedbridge_server import privacy, secagg
from fedbridge_server.best import choose_best
from fedbridge_server.config import FederationConfig
from fedbridge_server.quorum import QuorumError, SnapshotGrid, Stopped, exchange, wait_for_sites
from fedbridge_server.status import now, write_live
from fedbridge_server.store import RoundStore, RunState
from fedbridge_server.strategy import (
    record_state,
    screen_replies,
    site_label,
    state_record,
    strategy_state,
)
from fedbridge_shared import protocol as P
from fedbridge_shared import rounds as R
from fedbridge_shared.engine import evaluate
from fedbridge_shared.errors import FedbridgeError
from fedbridge_shared.spec import ModelSpec

log = logging.getLogger("fedbridge.server")
PROGRESS_EVERY = 30.0  # seconds between "still waiting" lines on the coordinator's console


@dataclass
class Clock:
    """Time as the loop sees it: real by default, fake in tests; ``stop`` set ends the run
    (a signal handler sets it) at its next poll, with the completed rounds kept."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class Federation:
    """Everything a run holds between rounds (built once by ``federation.prepare``)."""

    cfg: FederationConfig
    spec: ModelSpec
    model: torch.nn.Module
    store: RoundStore
    state: RunState
    strategy: Any
    reference: dict[str, torch.Tensor]
    global_state: dict[str, torch.Tensor]
    val_loader: DataLoader | None = None
    dp: Any = None  # federation._Privacy when site-level DP is on
    start: tuple[float | None, dict] = (None, {})
    """DP: the starting weights' validation accuracy and state (``release.py``)."""
    names: dict[int, str] = field(default_factory=dict)  # node id → the name a site reported


def wait_timeout(cfg: FederationConfig, rnd: int, first_round: int) -> float:
    """``join-timeout`` for the run's first round (or the first after a resume), else at most
    ``site-wait-timeout`` and never more than ``round-timeout``."""
    if rnd == first_round:
        return cfg.join_timeout
    return min(cfg.site_wait_timeout, cfg.round_timeout)


class RoundLoop:
    """Runs rounds ``state.completed + 1 … num-server-rounds`` of ``fed`` on ``grid``."""

    def __init__(
        self, grid: Grid, fed: Federation, console: Console, clock: Clock | None = None
    ) -> None:
        self.grid, self.fed, self.console = grid, fed, console
        self.clock = clock or Clock()
        self.first_round = fed.state.completed + 1
        self.expected = fed.cfg.min_available_sites  # lowered to who is left after a deadline
        self.private: dict | None = None  # this round's DP accounting
        self.secure: Any = None  # this round's secagg.SecureRound, when on
        self.round_started_at = now()

    def run(self) -> RunState:
        cfg = self.fed.cfg
        for rnd in range(self.first_round, cfg.num_server_rounds + 1):
            try:
                self.check_stop(rnd)
                row = self.one_round(rnd)
            except Stopped:
                raise Stopped(f"stopped on request in round {rnd}. {self.resume_hint()}") from None
            self.console.print(round_line(row, cfg.num_server_rounds))
        return self.fed.state

    def resume_hint(self) -> str:
        return self.fed.store.resume_hint(self.fed.state.completed)

    def check_stop(self, rnd: int) -> None:
        if self.clock.stop.is_set():
            raise Stopped("stopped on request")

    def one_round(self, rnd: int) -> dict[str, Any]:
        fed, cfg = self.fed, self.fed.cfg
        started, self.round_started_at = self.clock.now(), now()
        task = P.RoundTask(
            fed.spec.to_dict(), cfg.local_settings(), rnd, cfg.num_server_rounds, cfg.record_dp()
        )
        timeout = wait_timeout(cfg, rnd, self.first_round)
        usable, dropped, train_metrics = self.train(rnd, task, timeout)
        self.check_stop(rnd)
        usable_eval, eval_metrics = [], None
        if cfg.fraction_evaluate > 0:
            usable_eval, eval_metrics, dropped_eval = self.evaluate(rnd, task)
            dropped += dropped_eval
        self.check_stop(rnd)
        row = self.row(rnd, usable, dropped, train_metrics, usable_eval, eval_metrics)
        row[R.SECONDS] = round(self.clock.now() - started, 2)
        self.save(rnd, row)
        return row

    # -- phases ------------------------------------------------------------------------------

    def wait(self, rnd: int, phase: str, *, quorum: int, timeout: float) -> list[int]:
        """The connected node ids (see :func:`wait_for_sites`), printing who is awaited."""
        self.live(rnd, phase)
        what = f"round {rnd} {phase}"
        try:
            connected = wait_for_sites(
                self.grid, expected=self.expected, quorum=quorum, timeout=timeout, what=what,
                clock=self.clock.now, sleep=self.clock.sleep, stop=self.clock.stop,
                progress=lambda nodes, left: self.show_wait(what, nodes, left, timeout),
                progress_every=PROGRESS_EVERY,
            )  # fmt: skip
        except QuorumError as e:
            raise QuorumError(f"{e}. {self.resume_hint()}") from None
        if len(connected) < self.expected:
            here = ", ".join(sorted(site_label(n, self.fed.names) for n in connected))
            self.console.print(
                f"{what}: going on with {len(connected)} of {self.expected} sites "
                f"({escape(here)}) after {timeout:g} s",
                highlight=False,
            )
        self.expected = min(self.fed.cfg.min_available_sites, len(connected))
        return connected

    def show_wait(self, what: str, nodes: list[int], left: float, timeout: float) -> None:
        names = self.fed.names
        named = sorted(names[n] for n in nodes if n in names)
        unnamed = len(nodes) - len(named)
        here = ", ".join([*named, *([f"{unnamed} not named yet"] if unnamed else [])]) or "none"
        missing = sorted(set(names.values()) - {names.get(n) for n in nodes})
        awaited = f" (last seen: {', '.join(missing)})" if missing else ""
        self.console.print(
            f"{what}: waiting for {self.expected - len(nodes)} more site(s){awaited}; "
            f"connected {len(nodes)} of {self.expected}: {escape(here)}; going on with the "
            f"quorum in {left:.0f} s (wait {timeout:g} s)",
            highlight=False,
        )

    def train(self, rnd: int, task: P.RoundTask, timeout: float):
        fed, cfg = self.fed, self.fed.cfg
        connected = self.wait(rnd, "training", quorum=cfg.min_train_sites, timeout=timeout)
        self.secure = None
        if cfg.secure_aggregation:  # the coordinator sees only the sum (secagg.py)
            self.secure = secagg.secure_round(
                self.grid, connected, rnd=rnd, config=ConfigRecord(task.to_config()),
                global_state=fed.global_state, clip=cfg.secure_aggregation_clip,
                timeout=cfg.round_timeout, names=fed.names,
            )  # fmt: skip
            usable, dropped = self.secure.usable, self.secure.dropped
        else:
            sent = list(
                fed.strategy.configure_train(
                    rnd, state_record(fed.global_state), ConfigRecord(task.to_config()),
                    SnapshotGrid(self.grid, connected),
                )
            )  # fmt: skip
            replies = self.exchange(sent)
            usable, dropped = screen_replies(sent, replies, fed.reference, fed.names)
        if len(usable) < cfg.min_train_sites:
            raise QuorumError(
                f"round {rnd}: {len(usable)} usable update(s), fewer than the quorum of "
                f"{cfg.min_train_sites} (min-train-sites): {_why(dropped)}. {self.resume_hint()}"
            )
        if self.secure is not None:
            fed.global_state, self.private = self.secure.state, None
            return usable, dropped, self.secure.metrics
        arrays, metrics = fed.strategy.aggregate_train(rnd, usable)
        if arrays is None:
            raise FedbridgeError(f"round {rnd}: no site returned usable weights ({_why(dropped)})")
        if fed.dp is not None:
            fed.global_state, self.private = fed.dp.aggregate(rnd, fed.global_state, usable)
        else:
            fed.global_state, self.private = record_state(arrays, fed.reference), None
        return usable, dropped, metrics

    def evaluate(self, rnd: int, task: P.RoundTask):
        fed, cfg = self.fed, self.fed.cfg
        timeout = min(cfg.site_wait_timeout, cfg.round_timeout)
        connected = self.wait(rnd, "evaluation", quorum=1, timeout=timeout)
        sent = list(
            fed.strategy.configure_evaluate(
                rnd, state_record(fed.global_state), ConfigRecord(task.to_config()),
                SnapshotGrid(self.grid, connected),
            )
        )  # fmt: skip
        usable, dropped = screen_replies(sent, self.exchange(sent), None, fed.names)
        usable = [m for m in usable if _examples(m) > 0]  # no validation patients: no say
        metrics = None
        if usable and len(usable) >= cfg.min_evaluate_sites:
            metrics = fed.strategy.aggregate_evaluate(rnd, usable)
        return usable if metrics else [], metrics, [f"{d} (evaluation)" for d in dropped]

    def exchange(self, sent: list) -> list:
        return exchange(
            self.grid, sent, timeout=self.fed.cfg.round_timeout,
            clock=self.clock.now, sleep=self.clock.sleep, stop=self.clock.stop,
        )  # fmt: skip

    # -- bookkeeping -------------------------------------------------------------------------

    def row(self, rnd, usable, dropped, train_metrics, usable_eval, eval_metrics) -> dict:
        fed = self.fed
        fed.model.load_state_dict(fed.global_state, strict=False)
        trained = P.TrainReply.from_metrics(train_metrics) if train_metrics else None
        assessed = P.EvalReply.from_metrics(eval_metrics) if eval_metrics else None
        row: R.RoundRow = {
            R.ROUND: rnd,
            R.SITES: [site_label(m.metadata.src_node_id, fed.names) for m in usable],
            R.DROPPED: dropped,
            R.TRAIN_LOSS: trained.train_loss if trained else None,
            R.TRAIN_ACCURACY: trained.train_accuracy if trained else None,
            R.FEDERATED_VAL_LOSS: assessed.val_loss if assessed else None,
            R.FEDERATED_VAL_ACCURACY: assessed.val_accuracy if assessed else None,
            R.PER_SITE: per_site_metrics(
                fed.spec.labels, fed.names, train=usable, evaluated=usable_eval
            ),
        }
        if fed.cfg.dp.record_level:
            self.private = privacy.record_level(row[R.PER_SITE], fed.cfg.dp)
        if self.private is not None:
            row[R.PRIVACY] = self.private
        if self.secure is not None:
            row[R.SECURE_AGGREGATION] = self.secure.info
        if fed.val_loader is not None:
            stats = evaluate(fed.model, fed.val_loader, torch.device("cpu"))
            row[R.SERVER_VAL_LOSS] = stats.loss
            row[R.SERVER_VAL_ACCURACY] = stats.accuracy
            row[R.SERVER_VAL_EXAMPLES] = stats.n
        row[R.SCORE] = row.get(R.SERVER_VAL_LOSS, row[R.FEDERATED_VAL_LOSS])
        return row

    def save(self, rnd: int, row: dict) -> None:
        fed, state = self.fed, self.fed.state
        state.completed = rnd
        state.history.append(row)
        state.names = {str(k): v for k, v in sorted(fed.names.items())}
        kept = {state.best_round, *range(rnd - fed.store.keep_last + 1, rnd + 1)}
        state.best_round, state.best_score, state.best_rule = choose_best(
            state.history, available=kept.__contains__
        )
        fed.store.save_round(
            state, fed.spec, fed.model.state_dict(), {"stage": "federated", "round": rnd},
            {"round": row}, strategy_state(fed.strategy),
        )  # fmt: skip

    def live(self, rnd: int, phase: str) -> None:
        """``live.json`` for ``server status``: the round in progress and the sites by name."""
        try:
            run_id = self.grid.run.run_id
        except Exception:  # a grid without a run (tests' grids): the status shows none
            run_id = None
        write_live(
            self.fed.store.dir, run_id=run_id, round=rnd, rounds=self.fed.cfg.num_server_rounds,
            phase=phase, started_at=self.round_started_at, waiting_for=self.expected,
            nodes={str(k): v for k, v in self.fed.names.items()},
        )  # fmt: skip


def per_site_metrics(
    labels: tuple[str, ...], names: dict[int, str], *, train: list, evaluated: list
) -> dict[str, dict[str, Any]]:
    """Each site's numbers this round: its training reply, and its validation metrics of the
    new global weights (keys ``train_*``, ``val_*``, ``*_counts`` and ``val_correct`` per
    label)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, messages, reply in (("train", train, P.TrainReply), ("val", evaluated, P.EvalReply)):
        for msg in messages:
            name = site_label(msg.metadata.src_node_id, names)
            got = reply.from_metrics(msg.content.metric_records[P.METRICS])
            row = out.setdefault(name, {})
            row[f"{kind}_examples"] = int(got.num_examples)
            row[f"{kind}_counts"] = got.counts_by_label(labels)
            if kind == "val":
                row["val_correct"] = got.correct_by_label(labels)
            for key in ("loss", "accuracy"):
                row[f"{kind}_{key}"] = float(getattr(got, f"{kind}_{key}"))
            if kind == "train" and got.epsilon:  # record-level DP: this site's ε so far
                row |= {"epsilon": float(got.epsilon), "dp_patients": int(got.dp_patients),
                        "noise_multiplier": float(got.noise_multiplier)}  # fmt: skip
    return dict(sorted(out.items()))


def round_line(row: dict, total: int) -> str:
    parts = [f"round {row[R.ROUND]}/{total}", f"sites {len(row[R.SITES])}"]
    for key, label in (
        (R.TRAIN_LOSS, "train loss"),
        (R.FEDERATED_VAL_ACCURACY, "val acc"),
        (R.SERVER_VAL_ACCURACY, "server val acc"),
    ):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.3f}")
    if row.get(R.SECURE_AGGREGATION):
        parts.append("secure aggregation")
    if row.get(R.PRIVACY):
        parts.append(f"ε {row[R.PRIVACY]['epsilon']:.2f}")
    parts.append(f"{row[R.SECONDS]:.1f}s")
    if row[R.DROPPED]:
        parts.append("[yellow]dropped: " + escape("; ".join(row[R.DROPPED])) + "[/]")
    return "  ".join(parts)


def _examples(msg) -> float:
    metrics = msg.content.metric_records.get(P.METRICS)
    return float(metrics.get(P.NUM_EXAMPLES, 0)) if metrics is not None else 0.0


def _why(dropped: list[str]) -> str:
    return "; ".join(dropped) or "no site sampled"
