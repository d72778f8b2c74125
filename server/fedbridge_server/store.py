"""Server state that survives a restart: one bundle per completed round plus ``state.json``.

Layout beside the final bundle ``OUT``: ``OUT-rounds/round-0003/`` (a verified bundle, plus the
strategy's optimizer state when it has one) and ``OUT-rounds/state.json``. Every write is atomic,
so a crash leaves the previous round intact.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from fedbridge_server.best import choose_best
from fedbridge_shared import rounds as R
from fedbridge_shared.errors import BundleError, ConfigError
from fedbridge_shared.files import atomic_write, strict_json
from fedbridge_shared.layout import beside
from fedbridge_shared.spec import Bundle, ModelSpec, load_bundle, save_bundle

log = logging.getLogger("fedbridge.server")
STRATEGY_FILE = "strategy.safetensors"


@dataclass
class RunState:
    """What ``state.json`` records: progress, best round and per-round metrics."""

    fingerprint: dict[str, Any]
    completed: int = 0
    best_round: int = 0
    best_score: float | None = None
    best_rule: str = ""  # which rule chose best_round (fedbridge_server.best.RULES)
    history: list[dict[str, Any]] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # node id → the name its site reported


class RoundStore:
    """Checkpoints of a federated run, for resume and best-model selection."""

    def __init__(self, out: Path, keep_last: int = 2) -> None:
        self.out = Path(out)
        self.dir = beside(self.out, "rounds")
        self.keep_last = keep_last

    def round_dir(self, rnd: int) -> Path:
        return self.dir / f"round-{rnd:04d}"

    def resume_hint(self, completed: int | None = None) -> str:
        """How far the run got and how to go on (``completed`` read from state.json if None)."""
        if completed is None:
            try:
                completed = int(json.loads((self.dir / "state.json").read_text())["completed"])
            except (OSError, ValueError, KeyError, TypeError):
                completed = 0
        if not completed:
            return "No round completed; rerun the same command to start again."
        return (
            f"Rounds up to {completed} are saved in {self.dir}; rerun the same command to resume."
        )

    def load(self, fingerprint: dict[str, Any]) -> tuple[RunState, Bundle | None, dict]:
        """The state to resume from: the newest round whose bundle verifies, or a fresh start.

        A run with a different fingerprint (init bundle, strategy, seed, …) is refused.
        """
        path = self.dir / "state.json"
        if not path.exists():
            return RunState(fingerprint), None, {}
        try:
            raw = json.loads(path.read_text())
            state = RunState(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"{path}: unreadable run state ({e}); move it away to restart") from e
        if state.fingerprint != fingerprint:
            changed = sorted(
                k
                for k in {*fingerprint, *state.fingerprint}
                if fingerprint.get(k) != state.fingerprint.get(k)
            )
            raise ConfigError(
                f"{self.dir}: holds a run with other settings ({', '.join(changed)}); "
                "use another --out or delete that folder"
            )
        for rnd in range(state.completed, 0, -1):
            try:
                bundle = load_bundle(self.round_dir(rnd))
            except BundleError as e:
                log.warning("round %d checkpoint unusable (%s); trying the one before", rnd, e)
                continue
            strategy_file = self.round_dir(rnd) / STRATEGY_FILE
            extra = load_file(str(strategy_file)) if strategy_file.exists() else {}
            state.history = [h for h in state.history if h[R.ROUND] <= rnd]
            if state.best_round > rnd:
                state.best_round, state.best_score, state.best_rule = choose_best(
                    state.history, available=lambda r: self.round_dir(r).is_dir()
                )
            state.completed = rnd
            return state, bundle, extra
        return RunState(fingerprint), None, {}

    def save_round(
        self,
        state: RunState,
        spec: ModelSpec,
        weights: dict[str, torch.Tensor],
        training: dict[str, Any],
        metrics: dict[str, Any],
        strategy_state: dict[str, torch.Tensor],
    ) -> None:
        """Write round ``state.completed`` (bundle first, then state.json), then prune."""
        rnd = state.completed
        target = self.round_dir(rnd)
        save_bundle(target, spec, weights, training, metrics)
        if strategy_state:
            tensors = {k: v.contiguous() for k, v in strategy_state.items()}
            atomic_write(target / STRATEGY_FILE, save(tensors))
        self._write_state(state)
        self._prune(state)

    def _write_state(self, state: RunState) -> None:
        where = str(self.dir / "state.json")
        text = strict_json(state.__dict__, where=where, indent=2, default=str) + "\n"
        atomic_write(self.dir / "state.json", text.encode())

    def _prune(self, state: RunState) -> None:
        keep = {state.best_round, *range(state.completed - self.keep_last + 1, state.completed + 1)}
        for d in self.dir.glob("round-*"):
            try:
                rnd = int(d.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if rnd not in keep:
                shutil.rmtree(d, ignore_errors=True)
