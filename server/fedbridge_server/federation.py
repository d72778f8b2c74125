"""The coordinator's round loop: train → screen → aggregate → evaluate → checkpoint.

Written out (rather than ``Strategy.start``) so a restarted server resumes after the last
completed round, drops failing sites with a logged reason, and keeps the best round.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from rich.console import Console
from torch.utils.data import DataLoader

from fedbridge_server import privacy, release, secagg
from fedbridge_server.config import FederationConfig
from fedbridge_server.quorum import QuorumError, SnapshotGrid, exchange, wait_for_sites
from fedbridge_server.status import now, write_live
from fedbridge_server.store import RoundStore, RunState
from fedbridge_server.strategy import (
    build_strategy,
    record_state,
    restore_strategy_state,
    screen_replies,
    state_record,
    strategy_state,
)
from fedbridge_shared import protocol as P
from fedbridge_shared.data.samples import check_labels
from fedbridge_shared.data.tensors import make_loader
from fedbridge_shared.engine import evaluate
from fedbridge_shared.errors import ConfigError, FedbridgeError
from fedbridge_shared.metrics import format_metrics_table
from fedbridge_shared.models import model_from_bundle, retarget
from fedbridge_shared.spec import Bundle, ModelSpec, load_bundle, save_bundle
from fedbridge_shared.training import decode, evaluate_bundle, usable_index

log = logging.getLogger("fedbridge.server")
_NOT_IN_FINGERPRINT = {
    "round-timeout",
    "out",
    "test-data",
    "min-train-sites",
    "min-evaluate-sites",
    "min-available-sites",
    "join-timeout",
    "site-wait-timeout",
}


def fingerprint(cfg: FederationConfig, init_sha256: str) -> dict[str, Any]:
    """Settings that change the weights: a resumed run must match them."""
    d = {k: v for k, v in cfg.to_flat().items() if k not in _NOT_IN_FINGERPRINT}
    return {**d, "init": init_sha256}


def _server_val(cfg: FederationConfig, spec: ModelSpec, console: Console) -> DataLoader | None:
    if not cfg.val_data:
        return None
    index = usable_index(Path(cfg.val_data))
    check_labels(index, spec.labels, where=Path(cfg.val_data))
    images = decode(
        index.samples, spec.image_size, console=console, what="server validation images"
    )
    targets = [spec.labels.index(s.label) for s in index.samples]
    return make_loader(images, targets, spec, batch_size=32)


def per_site_metrics(
    labels: tuple[str, ...], names: dict[int, str], *, train: list, evaluated: list
) -> dict[str, dict[str, Any]]:
    """Each site's numbers this round: its training reply, and its validation metrics of the
    new global weights (keys ``train_*``, ``val_*``, ``*_counts`` and ``val_correct`` per
    label)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, messages, reply in (("train", train, P.TrainReply), ("val", evaluated, P.EvalReply)):
        for msg in messages:
            name = names.get(msg.metadata.src_node_id, f"node {msg.metadata.src_node_id}")
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


def _examples(msg) -> float:
    metrics = msg.content.metric_records.get(P.METRICS)
    return float(metrics.get(P.NUM_EXAMPLES, 0)) if metrics is not None else 0.0


def initial_model(init: Bundle, labels: tuple[str, ...]) -> tuple[torch.nn.Module, ModelSpec]:
    """The bridge bundle's model, for the target's ``labels`` when they differ (rows by name)."""
    if not labels or tuple(labels) == init.spec.labels:
        return model_from_bundle(init), init.spec
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise ConfigError(f"run config: 'labels' must be 2 or more distinct names, got {labels}")
    return retarget(init, labels)


def run_federation(grid: Grid, cfg: FederationConfig, console: Console | None = None) -> dict:
    """Run (or resume) the federated target stage; returns a summary with the round history.

    A run that fails (an error, SIGTERM, a full disk) before its first round completes leaves
    no ``OUT-rounds`` folder behind when it created that folder: there is nothing to resume.
    """
    rounds = RoundStore(Path(cfg.out)).dir
    existed = os.path.lexists(rounds)
    try:
        return _run_federation(grid, cfg, console)
    except BaseException:
        if not existed and not (rounds / "state.json").exists():
            shutil.rmtree(rounds, ignore_errors=True)
        raise


def _run_federation(grid: Grid, cfg: FederationConfig, console: Console | None) -> dict:
    console = console or Console(stderr=True)
    if not cfg.init:
        raise ConfigError("run config: 'init' must name the bridge bundle to start from")
    init = load_bundle(Path(cfg.init))
    model, spec = initial_model(init, cfg.target_labels())
    start_state = {k: v.clone() for k, v in model.state_dict().items()} if cfg.dp.enabled else {}
    if cfg.intensity:  # the target's preprocessing may differ from the bridge's
        spec = dataclasses.replace(spec, intensity=cfg.intensity)
    store = RoundStore(Path(cfg.out))
    state, resumed, saved_strategy = store.load(fingerprint(cfg, init.sha256))
    store.dir.mkdir(parents=True, exist_ok=True)
    if resumed is not None:
        model = model_from_bundle(resumed)
    if spec.init.get("head") in ("mapped", "new"):
        carried = [k for k, v in spec.init["label_map"].items() if v is not None]
        fresh = [k for k, v in spec.init["label_map"].items() if v is None]
        console.print(
            f"target labels {', '.join(spec.labels)} (bridge: "
            f"{', '.join(spec.init['source_labels'])}): classifier rows carried for "
            f"{', '.join(carried) or 'none'}; new for {', '.join(fresh) or 'none'}"
        )
    reference = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    global_state = dict(reference)
    strategy = build_strategy(cfg)
    restore_strategy_state(strategy, saved_strategy)
    if resumed is not None:
        console.print(f"resuming after round {state.completed} from {store.dir}")
    val_loader = _server_val(cfg, spec, console)
    settings = cfg.local_settings()
    names: dict[int, str] = {}
    dp = _Privacy(cfg, model, console) if cfg.dp.site_level else None
    if cfg.dp.record_level:
        console.print(_record_line(cfg))
    start = None  # DP: the starting weights' validation accuracy (release.py)
    if cfg.dp.enabled:
        start_cfg = ConfigRecord(P.RoundTask(spec.to_dict(), settings, 1, 1).to_config())
        start = release.start_accuracy(
            grid, strategy, cfg, state=dict(reference), model=model, val_loader=val_loader,
            config=start_cfg, names=names,
        )  # fmt: skip
        model.load_state_dict(global_state, strict=False)
    for rnd in range(state.completed + 1, cfg.num_server_rounds + 1):
        started = time.perf_counter()
        task = P.RoundTask(spec.to_dict(), settings, rnd, cfg.num_server_rounds, cfg.record_dp())
        config = ConfigRecord(task.to_config())
        first = rnd == state.completed + 1
        live = _live(grid, store, rnd, cfg, names)
        live("training")
        connected = wait_for_sites(
            grid, expected=cfg.min_available_sites, quorum=cfg.min_train_sites,
            timeout=cfg.join_timeout if first else cfg.site_wait_timeout,
            what=f"round {rnd} training",
        )  # fmt: skip
        secure = None
        if cfg.secure_aggregation:  # the coordinator sees only the sum (secagg.py)
            secure = secagg.secure_round(
                grid, connected, rnd=rnd, config=config, global_state=global_state,
                clip=cfg.secure_aggregation_clip, timeout=cfg.round_timeout, names=names,
            )  # fmt: skip
            usable, dropped = secure.usable, secure.dropped
        else:
            snapshot = SnapshotGrid(grid, connected)
            sent = list(strategy.configure_train(rnd, state_record(global_state), config, snapshot))
            replies = exchange(grid, sent, timeout=cfg.round_timeout)
            usable, dropped = screen_replies(sent, replies, reference, names)
        if len(usable) < cfg.min_train_sites:
            why = "; ".join(dropped) or "no site sampled"
            raise QuorumError(
                f"round {rnd}: {len(usable)} usable update(s), fewer than the quorum of "
                f"{cfg.min_train_sites} (min-train-sites): {why}. {_resumable(store, state)}"
            )
        if secure is not None:
            arrays, train_metrics = True, secure.metrics
        else:
            arrays, train_metrics = strategy.aggregate_train(rnd, usable)
        if arrays is None:
            why = "; ".join(dropped) or "no site sampled"
            raise FedbridgeError(f"round {rnd}: no site returned usable weights ({why})")
        if secure is not None:
            private, global_state = None, secure.state
        elif dp is not None:
            global_state, private = dp.aggregate(rnd, global_state, usable)
        else:
            private = None
            global_state = record_state(arrays, reference)
        eval_cfg = ConfigRecord(task.to_config())
        eval_metrics, usable_eval = None, []
        if cfg.fraction_evaluate > 0:
            live("evaluation")
            connected = wait_for_sites(
                grid, expected=cfg.min_available_sites, quorum=1,
                timeout=cfg.site_wait_timeout, what=f"round {rnd} evaluation",
            )  # fmt: skip
            snapshot = SnapshotGrid(grid, connected)
            sent_eval = list(
                strategy.configure_evaluate(rnd, state_record(global_state), eval_cfg, snapshot)
            )
            eval_replies = exchange(grid, sent_eval, timeout=cfg.round_timeout)
            usable_eval, dropped_eval = screen_replies(sent_eval, eval_replies, None, names)
            dropped += [f"{d} (evaluation)" for d in dropped_eval]
            # a site without validation patients has nothing to weigh in
            usable_eval = [m for m in usable_eval if _examples(m) > 0]
            if usable_eval and len(usable_eval) >= cfg.min_evaluate_sites:
                eval_metrics = strategy.aggregate_evaluate(rnd, usable_eval)
        model.load_state_dict(global_state, strict=False)
        trained = P.TrainReply.from_metrics(train_metrics) if train_metrics else None
        assessed = P.EvalReply.from_metrics(eval_metrics) if eval_metrics else None
        row: dict[str, Any] = {
            "round": rnd,
            "sites": [n for n in map(lambda m: names.get(m.metadata.src_node_id), usable) if n],
            "dropped": dropped,
            "train_loss": trained.train_loss if trained else None,
            "train_accuracy": trained.train_accuracy if trained else None,
            "federated_val_loss": assessed.val_loss if assessed else None,
            "federated_val_accuracy": assessed.val_accuracy if assessed else None,
        }
        row["per_site"] = per_site_metrics(
            spec.labels, names, train=usable, evaluated=usable_eval if eval_metrics else []
        )
        if cfg.dp.record_level:
            private = privacy.record_level(row["per_site"], cfg.dp)
        if private is not None:
            row["privacy"] = private
        if secure is not None:
            row["secure_aggregation"] = secure.info
        if val_loader is not None:
            stats = evaluate(model, val_loader, torch.device("cpu"))
            row.update(server_val_loss=stats.loss, server_val_accuracy=stats.accuracy)
        row["score"] = row.get("server_val_loss", row["federated_val_loss"])
        row["seconds"] = round(time.perf_counter() - started, 2)
        state.completed = rnd
        state.history.append(row)
        if row["score"] is not None and (
            state.best_score is None or row["score"] < state.best_score
        ):
            state.best_round, state.best_score = rnd, row["score"]
        elif state.best_round == 0:
            state.best_round = rnd
        store.save_round(
            state,
            spec,
            model.state_dict(),
            {"stage": "federated", "round": rnd},
            {"round": row},
            strategy_state(strategy),
        )
        console.print(_round_line(row, cfg.num_server_rounds))
    return _finish(cfg, store, state, spec, init.sha256, console, start=(start, start_state))


class _Privacy:
    """Site-level DP for the round loop: σ fixed for the run, noise reproducible per round."""

    def __init__(self, cfg: FederationConfig, model: torch.nn.Module, console: Console) -> None:
        self.cfg = cfg
        self.sample_rate = min(1.0, cfg.fraction_train)
        self.sigma = privacy.noise_multiplier(
            cfg.dp, rounds=cfg.num_server_rounds, sample_rate=self.sample_rate
        )
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        planned = self.epsilon(cfg.num_server_rounds)
        console.print(
            f"differential privacy: clip {cfg.dp.clipping_norm:g}, noise multiplier "
            f"{self.sigma:.3f}, ε {planned:.2f} at δ {cfg.dp.delta:g} after "
            f"{cfg.num_server_rounds} round(s) ({privacy.ACCOUNTANT})"
        )

    def epsilon(self, rounds: int) -> float:
        return privacy.epsilon(
            self.sigma, sample_rate=self.sample_rate, rounds=rounds, delta=self.cfg.dp.delta
        )

    def aggregate(self, rnd: int, global_state, usable) -> tuple[dict, dict]:
        states = [
            record_state(next(iter(m.content.array_records.values())), global_state) for m in usable
        ]
        generator = torch.Generator().manual_seed(self.cfg.local.seed * 1_000_003 + rnd)
        new, info = privacy.private_mean(
            global_state, states, trainable=self.trainable,
            clipping_norm=self.cfg.dp.clipping_norm, sigma=self.sigma, generator=generator,
        )  # fmt: skip
        return new, {
            "epsilon": self.epsilon(rnd),
            "delta": self.cfg.dp.delta,
            "noise_multiplier": self.sigma,
            "clipping_norm": self.cfg.dp.clipping_norm,
            "sample_rate": self.sample_rate,
            "accountant": privacy.ACCOUNTANT,
            **info.__dict__,
        }


def _record_line(cfg: FederationConfig) -> str:
    budget = (
        f"noise multiplier {cfg.dp.noise_multiplier:g}"
        if cfg.dp.noise_multiplier
        else f"each site's σ for ε {cfg.dp.target_epsilon:g} at δ {cfg.dp.delta:g} over the run"
    )
    return (
        f"differential privacy: DP-SGD at every site, one patient per record, gradient clip "
        f"{cfg.dp.max_grad_norm:g}, {budget} ({privacy.RECORD_ACCOUNTANT})"
    )


def _live(grid: Grid, store: RoundStore, rnd: int, cfg: FederationConfig, names: dict):
    """A writer of ``live.json`` for round ``rnd``: ``live(phase)`` (see ``status``)."""
    try:
        run_id = grid.run.run_id
    except Exception:  # a grid without a run (tests' grids): the status shows none
        run_id = None
    started = now()
    return lambda phase: write_live(
        store.dir, run_id=run_id, round=rnd, rounds=cfg.num_server_rounds, phase=phase,
        started_at=started, waiting_for=cfg.min_available_sites,
        nodes={str(k): v for k, v in names.items()},
    )  # fmt: skip


def _resumable(store: RoundStore, state: RunState) -> str:
    if state.completed == 0:
        return "No round completed; rerun the same command to start again."
    return (
        f"Rounds up to {state.completed} are saved in {store.dir}; rerun the same command to "
        "resume."
    )


def _round_line(row: dict, total: int) -> str:
    parts = [f"round {row['round']}/{total}", f"sites {len(row['sites'])}"]
    for key, label in (
        ("train_loss", "train loss"),
        ("federated_val_accuracy", "val acc"),
        ("server_val_accuracy", "server val acc"),
    ):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.3f}")
    if row.get("secure_aggregation"):
        parts.append("secure aggregation")
    if row.get("privacy"):
        parts.append(f"ε {row['privacy']['epsilon']:.2f}")
    parts.append(f"{row['seconds']:.1f}s")
    if row["dropped"]:
        parts.append("[yellow]dropped: " + "; ".join(row["dropped"]) + "[/]")
    return "  ".join(parts)


def _finish(
    cfg, store: RoundStore, state: RunState, spec: ModelSpec, init_sha: str, console, start
):
    """Copy the best round to ``cfg.out`` and assess it on the test set when given."""
    best = load_bundle(store.round_dir(state.best_round))
    training = {
        "stage": "federated",
        "config": cfg.to_flat(),
        "init_sha256": init_sha,
        "rounds": state.completed,
        "best_round": state.best_round,
        "history": state.history,
    }
    spent = [h["privacy"] for h in state.history if h.get("privacy")]
    if spent and spent[-1].get("level") == "record":
        training["privacy"] = privacy.record_total(spent, cfg.dp)
        console.print(privacy.record_summary(training["privacy"]))
    elif spent:  # every round the released model depends on counts, not only the best one
        keep = ("epsilon", "delta", "noise_multiplier", "clipping_norm", "sample_rate")
        training["privacy"] = {k: spent[-1][k] for k in (*keep, "accountant")} | {
            "rounds": len(spent),
            "level": "site",
        }
        console.print(
            f"privacy spent: ε {spent[-1]['epsilon']:.2f} at δ {spent[-1]['delta']:g} over "
            f"{len(spent)} round(s)"
        )
    init = {
        "kind": "bundle",
        "source": str(Path(cfg.init).resolve()),
        "sha256": init_sha,
        "head": "kept",
        "previous_init": spec.init,
    }
    if "label_map" in spec.init:  # retargeted: spec.init already names the bridge bundle
        init = spec.init
    final_spec = ModelSpec(**{**spec.__dict__, "init": init})
    best_row = state.history[state.best_round - 1]
    start_acc, start_state = start
    dp_acc = release.best_accuracy(best_row)
    if spent and start_acc is not None and dp_acc is not None and dp_acc < start_acc - 1e-9:
        aside = save_bundle(
            release.aside(Path(cfg.out)), final_spec, best.state_dict,
            {**training, "released": False}, {"best_round": best_row},
        )  # fmt: skip
        training |= {"released": "start", "dp_bundle": str(aside), "dp_val_accuracy": dp_acc,
                     "start_val_accuracy": start_acc}  # fmt: skip
        console.print(
            f"[yellow]the DP model validates below its start (accuracy {dp_acc:.3f} < "
            f"{start_acc:.3f}): kept the starting bundle as the result; DP bundle: {aside}[/]"
        )
        best_state = {k: v for k, v in start_state.items() if k in best.state_dict}
    else:
        best_state = best.state_dict
        if start_acc is not None:
            training["start_val_accuracy"] = start_acc
    out = save_bundle(
        Path(cfg.out),
        final_spec,
        best_state,
        training,
        {"best_round": best_row},
    )
    summary: dict[str, Any] = {
        "bundle": str(out),
        "best_round": state.best_round,
        "history": state.history,
    }
    console.print(f"best round {state.best_round} → {out}")
    if cfg.test_data:
        metrics, _, _ = evaluate_bundle(out, Path(cfg.test_data), console=console)
        summary["test"] = metrics
        console.print(f"test set {cfg.test_data}:")
        console.print(format_metrics_table(metrics))
    return summary
