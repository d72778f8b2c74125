"""Federation run settings: dotted kebab-case keys in ``[tool.flwr.app.config]``.

``dp.noise-multiplier = 0.5`` sets ``FederationConfig.dp.noise_multiplier``. Unknown keys and
values of the wrong type are refused with an error that names the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedbridge_shared import defaults
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.protocol import LocalSettings, RecordDP, kebab

STRATEGIES = defaults.STRATEGIES
MAX_SECONDS = 7 * 24 * 3600.0  # the longest wait any timeout may ask for
INLINE = {"inline": True}
"""Field metadata: the sub-config's keys sit at the top level of the flat run config."""


DP_MAX_NOISE = 1e3  # σ beyond this drowns any update; Opacus' search tops out near it
DP_MIN_EPSILON, DP_MAX_EPSILON = 0.05, 1e3
DP_LEVELS = ("site", "record")

_HINTS = {
    "intensity": ": one of none, clahe (empty: the bridge bundle's)",
    "min-train-sites": ": the quorum must be between 1 and min-available-sites",
    "min-evaluate-sites": ": must be between 0 and min-available-sites",
    "dp.noise-multiplier": f": 0 (derive it from dp.target-epsilon) up to {1e3:g}",
    "dp.target-epsilon": f": between {0.05:g} and {1e3:g}",
    "dp.enabled": ": site-level differential privacy works with fedavg or fedprox, not fedadam or "
    "fedavgm",
    "dp.level": ": site (the coordinator noises each site's update; large federations) or record "
    "(DP-SGD per patient at each site)",
    "dp.max-grad-norm": ": the per-patient gradient clip of DP-SGD, > 0 and ≤ 100",
    "proximal-mu": ": dp.level=record works with fedavg, fedadam or fedavgm: DP-SGD clips "
    "per-patient gradients, which FedProx's term is not",
    "balanced": ": dp.level=record samples patients uniformly (Poisson): set balanced=false",
    "secure-aggregation": ": needs fedavg or fedprox, min-train-sites ≥ 2, fraction-train 1 and no "
    "site-level dp.enabled (it clips each site's update, which the coordinator no longer sees; "
    "dp.level=record works with it)",
    "secure-aggregation-clip": ": the largest |weight change| a site's update may carry, > 0 "
    "and ≤ 1000",
}


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy. ``level = site``: the coordinator clips each site's update and adds
    Gaussian noise to the sum (privacy of a whole site; for large federations). ``level =
    record``: every site runs DP-SGD (Opacus) with one patient as the record."""

    enabled: bool = False
    level: str = "site"
    clipping_norm: float = 1.0
    """Site level: L2 bound of one site's update (its trainable weights minus the global ones)."""
    max_grad_norm: float = 1.0
    """Record level: L2 bound of one patient's gradient in a DP-SGD step."""
    noise_multiplier: float = 0.0
    """σ (site level: noise std = σ·clipping-norm / sites; record level: σ·max-grad-norm per
    step). 0: the smallest σ that reaches target-epsilon (record level: at each site)."""
    target_epsilon: float = 8.0
    delta: float = 1e-5

    @property
    def site_level(self) -> bool:
        return self.enabled and self.level == "site"

    @property
    def record_level(self) -> bool:
        return self.enabled and self.level == "record"


@dataclass(frozen=True)
class FedAdamConfig:
    eta: float = 1e-3
    eta_l: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9


@dataclass(frozen=True)
class FedAvgMConfig:
    """FedAvg with server momentum (Hsu et al. 2019): v ← β·v + Δ, w ← w − η·v, where Δ is the
    global weights minus the sites' weighted mean."""

    server_lr: float = defaults.SERVER_LR
    momentum: float = defaults.SERVER_MOMENTUM


@dataclass(frozen=True)
class FederationConfig:
    """Everything the coordinator decides for a federated target stage."""

    init: str = ""  # the bridge bundle the federation starts from
    labels: str = ""
    """The target's labels, comma-separated (empty: the bridge bundle's). Rows of labels the
    bridge has are carried by name, new labels start fresh (``shared.models.retarget``)."""
    intensity: str = ""
    """Intensity normalisation of the target (``none`` | ``clahe``; empty: the bridge bundle's),
    written into the spec every site preprocesses by."""
    out: str = "runs/federated/model"  # final (best) bundle; rounds go to OUT-rounds/
    val_data: str = ""  # optional server-side validation set for best-model selection
    test_data: str = ""  # optional server-side test set, assessed once at the end
    simulation_sites: str = ""  # comma-separated site folders for `flwr run .` in simulation
    num_server_rounds: int = defaults.ROUNDS
    strategy: str = defaults.STRATEGY
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_available_sites: int = 2
    """The sites expected: each round waits for this many to be connected (within a deadline)."""
    min_train_sites: int = 2
    """The quorum: a round needs this many usable updates, else the run stops (resumable)."""
    min_evaluate_sites: int = 2
    """Federated validation metrics need this many replies, else the round has none."""
    join_timeout: float = defaults.JOIN_TIMEOUT
    """Seconds the first round waits for the expected sites; then it goes on with a quorum."""
    site_wait_timeout: float = defaults.SITE_WAIT_TIMEOUT
    """The same wait before every later training and evaluation (a lost site costs this)."""
    round_timeout: float = defaults.ROUND_TIMEOUT
    local: LocalSettings = field(default_factory=LocalSettings, metadata=INLINE)
    """What every site does each round (keys ``lr``, ``local-epochs``… at the top level)."""
    fedadam: FedAdamConfig = field(default_factory=FedAdamConfig)
    fedavgm: FedAvgMConfig = field(default_factory=FedAvgMConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    secure_aggregation: bool = False
    """The coordinator sees only the sum of the sites' updates (``server.secagg``)."""
    secure_aggregation_clip: float = 8.0
    """Per-weight range ±clip of an update under secure aggregation (fixed-point quantised)."""

    def __post_init__(self) -> None:
        checks = {
            "strategy": self.strategy in STRATEGIES,
            "intensity": self.intensity in ("", *defaults.INTENSITIES),
            "num-server-rounds": 1 <= self.num_server_rounds <= 10_000,
            "fraction-train": 0 < self.fraction_train <= 1,
            "fraction-evaluate": 0 <= self.fraction_evaluate <= 1,
            "min-available-sites": self.min_available_sites >= 1,
            "min-train-sites": 1 <= self.min_train_sites <= self.min_available_sites,
            "min-evaluate-sites": 0 <= self.min_evaluate_sites <= self.min_available_sites,
            "join-timeout": 0 < self.join_timeout <= MAX_SECONDS,
            "site-wait-timeout": 0 < self.site_wait_timeout <= MAX_SECONDS,
            "round-timeout": 0 < self.round_timeout <= MAX_SECONDS,
            "dp.clipping-norm": 0 < self.dp.clipping_norm <= 1e6,
            "dp.noise-multiplier": 0 <= self.dp.noise_multiplier <= DP_MAX_NOISE,
            "dp.target-epsilon": DP_MIN_EPSILON <= self.dp.target_epsilon <= DP_MAX_EPSILON,
            "dp.delta": 0 < self.dp.delta < 1,
            "fedadam.eta": 0 < self.fedadam.eta <= 10,
            "fedadam.eta-l": 0 < self.fedadam.eta_l <= 10,
            "fedadam.beta-1": 0 <= self.fedadam.beta_1 < 1,
            "fedadam.beta-2": 0 <= self.fedadam.beta_2 < 1,
            "fedadam.tau": 0 < self.fedadam.tau <= 1,
            "fedavgm.server-lr": 0 < self.fedavgm.server_lr <= 10,
            "fedavgm.momentum": 0 <= self.fedavgm.momentum < 1,
            "dp.level": self.dp.level in DP_LEVELS,
            "dp.max-grad-norm": 0 < self.dp.max_grad_norm <= 100,
            "dp.enabled": not (self.dp.site_level and self.strategy in ("fedadam", "fedavgm")),
            "proximal-mu": not (self.dp.record_level and self.strategy == "fedprox"),
            "balanced": not (self.dp.record_level and self.local.balanced),
            "secure-aggregation": not self.secure_aggregation
            or (
                self.strategy in ("fedavg", "fedprox")
                and self.min_train_sites >= 2
                and self.fraction_train == 1
                and not self.dp.site_level
            ),
            "secure-aggregation-clip": 0 < self.secure_aggregation_clip <= 1000,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            hint = _HINTS.get(bad[0], "")
            raise ConfigError(
                f"run config: invalid value for {bad[0]!r} ({self._value(bad[0])!r}){hint}"
            )

    def _value(self, key: str) -> Any:
        return self.to_flat().get(key)

    def target_labels(self) -> tuple[str, ...]:
        """``labels`` as a tuple (empty: keep the bridge bundle's)."""
        return tuple(x.strip() for x in self.labels.split(",") if x.strip())

    def record_dp(self) -> RecordDP | None:
        """What every site's DP-SGD uses (None unless ``dp.level = record``)."""
        if not self.dp.record_level:
            return None
        return RecordDP(
            max_grad_norm=self.dp.max_grad_norm, noise_multiplier=self.dp.noise_multiplier,
            target_epsilon=self.dp.target_epsilon, delta=self.dp.delta,
        )  # fmt: skip

    def local_settings(self) -> LocalSettings:
        """The part of the config every site receives each round."""
        if self.strategy == "fedprox":
            return self.local
        return dataclasses.replace(self.local, proximal_mu=0.0)

    def to_flat(self) -> dict[str, Any]:
        """Dotted kebab-case keys, as in ``[tool.flwr.app.config]``."""
        return _flatten(self)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> FederationConfig:
        return _build(cls, _unflatten(flat), prefix="")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(
                _flatten(
                    value, prefix if f.metadata.get("inline") else prefix + kebab(f.name) + "."
                )
            )
        else:
            out[prefix + kebab(f.name)] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = str(key).split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"run config: {key!r} conflicts with a plain value")
        node[leaf] = value
    return tree


def _keys(cls) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Flat key → (attribute path, field) for one level, inline sub-configs expanded."""
    known: dict[str, tuple[tuple[str, ...], Any]] = {}
    for f in fields(cls):
        if f.metadata.get("inline"):
            for key, (path, sub) in _keys(f.default_factory).items():
                known[key] = ((f.name, *path), sub)
        else:
            known[kebab(f.name)] = ((f.name,), f)
    return known


def _build(cls, tree: dict[str, Any], prefix: str):
    known = _keys(cls)
    values: dict[str, Any] = {}
    for key, value in tree.items():
        name = prefix + key
        if key not in known:
            raise ConfigError(f"run config: unknown key {name!r}")
        path, f = known[key]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"run config: {name!r} must be a table of settings")
            value = _build(type(default), value, name + ".")
        else:
            value = _coerce(name, value, type(default))
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    inline = {f.name: f.default_factory for f in fields(cls) if f.metadata.get("inline")}
    for name, factory in inline.items():
        if name in values:
            values[name] = factory(**values[name])
    return cls(**values)


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
    elif kind is int and not isinstance(value, bool):
        try:
            number = float(value)
            if math.isfinite(number) and number == int(number):
                return int(number)
        except (TypeError, ValueError, OverflowError):
            pass
    elif kind is float and not isinstance(value, bool):
        try:  # NaN and infinities are refused by the bounds, naming the key
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str:
        return str(value)
    shown = str(value) if len(str(value)) <= 40 else str(value)[:37] + "..."
    finite = " (finite)" if kind is int else ""
    raise ConfigError(f"run config: {name!r} must be {kind.__name__}{finite}, got {shown!r}")


_PATH_KEYS = ("init", "out", "val-data", "test-data")


def merge_overrides(
    flat: Mapping[str, Any], overrides: Mapping[str, str], *, given: Mapping[str, str]
) -> dict[str, Any]:
    """``flat`` (a command's options as run-config keys) with its ``--set`` overrides.

    ``given`` maps the keys whose option the user typed to that option (``"out"`` →
    ``"--out"``): an override of such a key must agree with the option, or it is refused
    (``--out A --set out=B`` would otherwise write to B without a word).
    """
    known = _keys(FederationConfig)
    for key, value in overrides.items():
        if key not in given or key not in flat or key not in known:
            continue
        if _setting(key, flat[key], known) != _setting(key, value, known):
            raise ConfigError(
                f"--set {key}={value} disagrees with {given[key]} {flat[key]}: set it once"
            )
    return {**flat, **overrides}


def _setting(key: str, value: Any, known: dict) -> Any:
    if key in _PATH_KEYS:
        return str(Path(str(value)).resolve()) if str(value) else ""
    _, f = known[key]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return _coerce(key, value, type(default))
