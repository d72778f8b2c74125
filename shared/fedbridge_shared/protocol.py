"""The federation protocol: what the coordinator and a site send each other, defined once.

Both ends import these names; Flower's records (``ArrayRecord``, ``ConfigRecord``,
``MetricRecord``) are built from them in the two thin app files only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedbridge_shared import defaults
from fedbridge_shared.errors import ConfigError

# Records of a message's RecordDict.
ARRAYS = "arrays"
WEIGHTS = "weights"
"""The one array of the ``arrays`` record: the model's weights packed into a vector
(:func:`fedbridge_shared.weights.pack`), so a message is a few HTTP objects, not hundreds."""
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
SITE_NAME = "name"
"""Key of the ``site`` ConfigRecord: the name a site reports (never a path)."""

# Keys of the ``config`` record besides the local settings.
SPEC_JSON = "spec-json"
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-server-rounds"

NUM_EXAMPLES = "num-examples"
"""Metric key Flower's strategies weight aggregation by."""

# A SuperNode's --node-config keys (site facts never sent by the server).
NODE_DATA_PATH = "data-path"
NODE_SITE_NAME = "site-name"
NODE_AUDIT_DIR = "audit-dir"
NODE_EVENTS_FILE = "events-file"
NODE_PARTITION_ID = "partition-id"
NODE_WORKER_SOCKET = "worker-socket"  # the site's long-lived worker (deployed sites)


def kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class LocalSettings:
    """What the server asks every site to do in a round (sent as kebab-case config keys)."""

    local_epochs: int = defaults.LOCAL_EPOCHS
    batch_size: int = defaults.BATCH_SIZE
    lr: float = defaults.LR
    weight_decay: float = defaults.WEIGHT_DECAY
    augment_per_sample: int = defaults.TARGET_AUGMENT_PER_SAMPLE
    augment: str = defaults.AUGMENT
    val_fraction: float = defaults.VAL_FRACTION
    label_smoothing: float = defaults.LABEL_SMOOTHING
    seed: int = defaults.SEED
    proximal_mu: float = defaults.PROXIMAL_MU
    ema_decay: float = defaults.SITE_EMA_DECAY
    """EMA of the site's weights within its round (0: off); the site replies with the EMA."""
    balanced: bool = defaults.BALANCED
    # torch CPU threads while training (0: torch's default). Floating-point sums depend on the
    # thread count, so bitwise-identical reruns need the same value on the same site.
    threads: int = 0

    def __post_init__(self) -> None:
        checks = {
            "local-epochs": self.local_epochs >= 1,
            "batch-size": self.batch_size >= 1,
            "lr": math.isfinite(self.lr) and 0 < self.lr <= 1,
            "weight-decay": math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "augment-per-sample": self.augment_per_sample >= 0,
            "augment": self.augment in defaults.AUGMENT_PRESETS,
            "val-fraction": 0 <= self.val_fraction <= 0.5,
            "seed": 0 <= self.seed < 2**32,
            "threads": self.threads >= 0,
            "ema-decay": math.isfinite(self.ema_decay) and 0 <= self.ema_decay < 1,
        }
        bad = next((k for k, ok in checks.items() if not ok), None)
        if bad is not None:
            value = getattr(self, bad.replace("-", "_"))
            raise ConfigError(f"run config: invalid value for {bad!r} ({value!r})")

    def to_config(self) -> dict[str, Any]:
        return {kebab(k): v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LocalSettings:
        """Pick this dataclass's keys out of a round config (other keys are ignored)."""
        values = {}
        for f in fields(cls):
            if kebab(f.name) in config:
                kind, value = type(getattr(cls(), f.name)), config[kebab(f.name)]
                if kind is bool and not isinstance(value, bool):  # bool("false") is True
                    raise ConfigError(f"run config: {kebab(f.name)!r} must be true or false")
                values[f.name] = kind(value)
        return cls(**values)


DP_SGD = "dp-sgd."
"""Prefix of the round config's record-level DP keys (``dp-sgd.max-grad-norm`` …)."""


@dataclass(frozen=True)
class RecordDP:
    """Record-level DP-SGD every site runs (``dp.level = record``): one record is one patient.

    ``noise_multiplier`` 0: each site derives the smallest σ that keeps its whole run (every
    round) within ``target_epsilon`` at ``delta`` for its own number of patients.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 8.0
    delta: float = 1e-5

    def to_config(self) -> dict[str, float]:
        return {DP_SGD + kebab(k): float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RecordDP | None:
        """The round config's DP-SGD settings (None: the round is not record-level private)."""
        keys = {f.name: DP_SGD + kebab(f.name) for f in fields(cls)}
        if not any(k in config for k in keys.values()):
            return None
        try:
            return cls(**{n: float(config[k]) for n, k in keys.items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed DP-SGD settings from the server: {e}") from None


@dataclass(frozen=True)
class RoundTask:
    """One round's instruction to a site: the model spec, the settings and where we are."""

    spec: dict[str, Any]
    settings: LocalSettings
    server_round: int
    num_rounds: int
    dp: RecordDP | None = None
    """Record-level DP-SGD at the site (None: ordinary training)."""

    def to_config(self) -> dict[str, Any]:
        return {
            **self.settings.to_config(),
            **(self.dp.to_config() if self.dp is not None else {}),
            SPEC_JSON: json.dumps(self.spec),
            SERVER_ROUND: self.server_round,
            NUM_ROUNDS: self.num_rounds,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RoundTask:
        try:
            spec = json.loads(str(config[SPEC_JSON]))
            server_round = int(config[SERVER_ROUND])
            num_rounds = int(config.get(NUM_ROUNDS, server_round))
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"malformed round config from the server: {e}") from e
        settings = LocalSettings.from_config(config)
        return cls(spec, settings, server_round, num_rounds, RecordDP.from_config(config))


CLASS_COUNT = "class-count-"
"""Metric key prefix of a reply's images per class: ``class-count-0`` … by label index."""
CLASS_CORRECT = "class-correct-"
"""Metric key prefix of an evaluation's correctly classified images per true class."""
_PER_CLASS = {"class_counts": CLASS_COUNT, "class_correct": CLASS_CORRECT}


def _per_class(metrics: Any, prefix: str) -> tuple[int, ...]:
    out: list[int] = []
    while f"{prefix}{len(out)}" in metrics:
        out.append(int(metrics[f"{prefix}{len(out)}"]))
    return tuple(out)


@dataclass(frozen=True)
class _Reply:
    """A typed metric reply; ``to_metrics`` gives the MetricRecord's plain numbers.

    ``class_counts`` (images per label index, before augmentation) travel as one integer metric
    per class: counts are aggregate numbers, never a file name or a patient id.
    """

    num_examples: int = 0
    class_counts: tuple[int, ...] = ()

    def to_metrics(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {NUM_EXAMPLES: int(self.num_examples)}
        for f in fields(self):
            if f.name in _PER_CLASS:
                for i, n in enumerate(getattr(self, f.name)):
                    out[f"{_PER_CLASS[f.name]}{i}"] = int(n)
            elif f.name != "num_examples":
                out[kebab(f.name)] = float(getattr(self, f.name))
        return out

    @classmethod
    def from_metrics(cls, metrics: Any) -> _Reply:
        """From a (possibly aggregated) MetricRecord; missing keys keep their defaults."""
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {
            n: metrics[kebab(n)] for n in names - set(_PER_CLASS) if kebab(n) in metrics
        }
        per_class = {n: _per_class(metrics, _PER_CLASS[n]) for n in names & set(_PER_CLASS)}
        return cls(**values, **per_class)

    def counts_by_label(self, labels: Sequence[str]) -> dict[str, int]:
        """``class_counts`` keyed by label name (empty when the site sent none)."""
        if len(self.class_counts) != len(labels):
            return {}
        return dict(zip(labels, self.class_counts, strict=True))


@dataclass(frozen=True)
class TrainReply(_Reply):
    """What a site reports after local training (besides the new weights)."""

    train_loss: float = 0.0
    train_accuracy: float = 0.0
    seconds: float = 0.0
    epsilon: float = 0.0
    """Record-level DP: ε this site has spent after this round (0: no DP-SGD)."""
    noise_multiplier: float = 0.0
    """Record-level DP: the σ of the site's DP-SGD."""
    dp_patients: int = 0
    """Record-level DP: patients (records) the site sampled from."""

    def to_metrics(self) -> dict[str, int | float]:
        """The DP keys travel only when the site trained with DP-SGD."""
        out = super().to_metrics()
        if not self.epsilon:
            for key in ("epsilon", "noise-multiplier", "dp-patients"):
                out.pop(key)
        return out


@dataclass(frozen=True)
class EvalReply(_Reply):
    """What a site reports after evaluating the global weights on its validation patients."""

    val_loss: float = 0.0
    val_accuracy: float = 0.0
    class_correct: tuple[int, ...] = ()  # correctly classified images per true class

    def correct_by_label(self, labels: Sequence[str]) -> dict[str, int]:
        """``class_correct`` keyed by label name (empty when the site sent none)."""
        if len(self.class_correct) != len(labels):
            return {}
        return dict(zip(labels, self.class_correct, strict=True))
