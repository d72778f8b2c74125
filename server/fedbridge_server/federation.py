"""A federated run: its starting point (:func:`prepare`), the rounds
(:class:`fedbridge_server.round_loop.RoundLoop`) and the final bundle (:func:`_finish`).

Written out (rather than ``Strategy.start``) so a restarted server resumes after the last
completed round, drops failing sites with a logged reason, and keeps the best round.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from rich.console import Console
from torch.utils.data import DataLoader

from fedbridge_server import privacy, release
from fedbridge_server.best import RULES
from fedbridge_server.config import FederationConfig
from fedbridge_server.round_loop import Clock, Federation, RoundLoop
from fedbridge_server.store import RoundStore, RunState
from fedbridge_server.strategy import build_strategy, record_state, restore_strategy_state
from fedbridge_shared import protocol as P
from fedbridge_shared import rounds as R
from fedbridge_shared.assessment import assess, write_assessment
from fedbridge_shared.data.samples import check_labels
from fedbridge_shared.data.tensors import make_loader
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.metrics import format_metrics_table
from fedbridge_shared.models import model_from_bundle, retarget
from fedbridge_shared.spec import Bundle, ModelSpec, load_bundle, save_bundle
from fedbridge_shared.training import decode, usable_index

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


def initial_model(init: Bundle, labels: tuple[str, ...]) -> tuple[torch.nn.Module, ModelSpec]:
    """The bridge bundle's model, for the target's ``labels`` when they differ (rows by name)."""
    if not labels or tuple(labels) == init.spec.labels:
        return model_from_bundle(init), init.spec
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise ConfigError(f"run config: 'labels' must be 2 or more distinct names, got {labels}")
    return retarget(init, labels)


def run_federation(
    grid: Grid, cfg: FederationConfig, console: Console | None = None, clock: Clock | None = None
) -> dict:
    """Run (or resume) the federated target stage; returns a summary with the round history.

    ``clock`` (see :class:`fedbridge_server.round_loop.Clock`) gives the time, the sleeps and
    the stop event the loop obeys; the default is real time with no stop. A run that fails (an
    error, SIGTERM, a full disk) before its first round completes leaves no ``OUT-rounds``
    folder behind when it created that folder: there is nothing to resume.
    """
    rounds = RoundStore(Path(cfg.out)).dir
    existed = os.path.lexists(rounds)
    try:
        return _run_federation(grid, cfg, console, clock)
    except BaseException:
        if not existed and not (rounds / "state.json").exists():
            shutil.rmtree(rounds, ignore_errors=True)
        raise


def _run_federation(
    grid: Grid, cfg: FederationConfig, console: Console | None, clock: Clock | None
) -> dict:
    console = console or Console(stderr=True)
    fed, init_sha = prepare(cfg, console, grid)
    RoundLoop(grid, fed, console, clock).run()
    return _finish(cfg, fed.store, fed.state, fed.spec, init_sha, console, start=fed.start)


def prepare(cfg: FederationConfig, console: Console, grid: Grid) -> tuple[Federation, str]:
    """The run's starting point: the bridge bundle (retargeted when asked) or the last saved
    round of a resumed run, its strategy state, the server's validation set; and the bridge's
    sha256."""
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
    strategy = build_strategy(cfg)
    restore_strategy_state(strategy, saved_strategy)
    if resumed is not None:
        console.print(f"resuming after round {state.completed} from {store.dir}")
    val_loader = _server_val(cfg, spec, console)
    names = {int(k): v for k, v in state.names.items()}
    if cfg.dp.record_level:
        console.print(_record_line(cfg))
    start = None  # DP: the starting weights' validation accuracy (release.py)
    if cfg.dp.enabled and resumed is None:
        settings = cfg.local_settings()
        start_cfg = ConfigRecord(P.RoundTask(spec.to_dict(), settings, 1, 1).to_config())
        start = release.start_accuracy(
            grid, strategy, cfg, state=dict(reference), model=model, val_loader=val_loader,
            config=start_cfg, names=names,
        )  # fmt: skip
        model.load_state_dict(reference, strict=False)
    fed = Federation(
        cfg=cfg, spec=spec, model=model, store=store, state=state, strategy=strategy,
        reference=reference, global_state=dict(reference), val_loader=val_loader,
        dp=_Privacy(cfg, model, console) if cfg.dp.site_level else None, names=names,
        start=(start, start_state),
    )  # fmt: skip
    return fed, init.sha256


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


def _finish(cfg, store: RoundStore, state: RunState, spec: ModelSpec, init_sha: str, console,
            start=(None, {})):  # fmt: skip
    """Copy the best round to ``cfg.out`` and assess it on the test set when given."""
    best = load_bundle(store.round_dir(state.best_round))
    training = {
        "stage": "federated",
        "config": cfg.to_flat(),
        "init_sha256": init_sha,
        "rounds": state.completed,
        "best_round": state.best_round,
        "best_round_rule": state.best_rule,
        "best_round_chosen_by": RULES.get(state.best_rule, ""),
        "history": state.history,
    }
    spent = [h[R.PRIVACY] for h in state.history if h.get(R.PRIVACY)]
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
        "best_round_rule": state.best_rule,
        "history": state.history,
    }
    console.print(
        f"best round {state.best_round} ({RULES.get(state.best_rule, state.best_rule)}) → {out}"
    )
    if cfg.test_data:
        summary["test"], summary["report"] = _assess_test(out, Path(cfg.test_data), console)
    return summary


def report_folder(out: Path) -> Path:
    """Where ``--test-data``'s report of the final bundle ``OUT`` goes: ``OUT-report``."""
    return out.with_name(out.name + "-report")


def _assess_test(out: Path, test: Path, console: Console) -> tuple[dict[str, Any], str]:
    """The final bundle on the server's test set: metrics and the report folder beside it."""
    result = assess(out, test, console=console)
    folder = report_folder(out)
    write_assessment(
        result, folder, title=f"fedbridge federated: {out.name} on {test.name}",
        config={"data": str(test.resolve()), "patient_ids": result.index.patient_source},
        counts={f"test: {test.name}": result.index.counts()}, test_name=f"test: {test.name}",
        warn=lambda text: console.print(f"[yellow]{text}[/]"),
    )  # fmt: skip
    console.print(f"test set {test}:")
    console.print(format_metrics_table(result.metrics))
    console.print(f"report: {folder / 'report.html'}")
    return result.metrics, str(folder)
