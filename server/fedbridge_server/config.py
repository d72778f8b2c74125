"""Federation run settings: dotted kebab-case keys in ``[tool.flwr.app.config]``.

``dp.noise-multiplier = 0.5`` sets ``FederationConfig.dp.noise_multiplier``. The keys, their
types and bounds come from the pydantic models below and the shared recipe types
(``fedbridge_shared.settings``); unknown keys and values of the wrong type or out of bounds are
refused with one line that names the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from fedbridge_shared import defaults
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.protocol import RecordDP
from fedbridge_shared.settings import (
    INLINE,
    Finite,
    Flag,
    LocalSettings,
    Settings,
    Text,
    Whole,
    coerce,
    flat_fields,
    from_flat,
    to_flat,
)

STRATEGIES = defaults.STRATEGIES
MAX_SECONDS = 7 * 24 * 3600.0  # the longest wait any timeout may ask for
DP_MAX_NOISE = 1e3  # σ beyond this drowns any update; Opacus' search tops out near it
DP_MIN_EPSILON, DP_MAX_EPSILON = 0.05, 1e3
DP_LEVELS = ("site", "record")


def quorum(sites: int) -> int:
    """The default quorum of ``sites`` expected sites: a majority (``server start`` and
    ``federate simulate`` alike), so a round goes on when a minority of sites is lost."""
    return sites // 2 + 1


Seconds = Annotated[float, Finite, Field(gt=0, le=MAX_SECONDS)]
Sites = Annotated[int, Whole, Field(ge=1, le=100_000)]
Fraction = Annotated[float, Finite, Field(ge=0, le=1)]
_HINTS = {
    "min-train-sites": ": the quorum must be between 1 and min-available-sites",
    "min-evaluate-sites": ": must be between 0 and min-available-sites",
    "dp.enabled": ": site-level differential privacy works with fedavg or fedprox, not fedadam or "
    "fedavgm",
    "proximal-mu": ": dp.level=record works with fedavg, fedadam or fedavgm: DP-SGD clips "
    "per-patient gradients, which FedProx's term is not",
    "balanced": ": dp.level=record samples patients uniformly (Poisson): set balanced=false",
    "secure-aggregation": ": needs fedavg or fedprox, min-train-sites ≥ 2, fraction-train 1 and no "
    "site-level dp.enabled (it clips each site's update, which the coordinator no longer sees; "
    "dp.level=record works with it)",
}


def _hint(text: str) -> Any:
    return {"hint": text}


class DPConfig(Settings):
    """Differential privacy. ``level = site``: the coordinator clips each site's update and adds
    Gaussian noise to the sum (privacy of a whole site; for large federations). ``level =
    record``: every site runs DP-SGD (Opacus) with one patient as the record."""

    enabled: Flag = False
    level: Literal[DP_LEVELS] = Field(  # type: ignore[valid-type]
        default="site",
        json_schema_extra=_hint(
            "site (the coordinator noises each site's update; large federations) or record "
            "(DP-SGD per patient at each site)"
        ),
    )
    clipping_norm: Annotated[float, Finite, Field(gt=0, le=1e6)] = 1.0
    """Site level: L2 bound of one site's update (its trainable weights minus the global ones)."""
    max_grad_norm: Annotated[float, Finite, Field(gt=0, le=100)] = Field(
        default=1.0, json_schema_extra=_hint("the per-patient gradient clip of DP-SGD")
    )
    """Record level: L2 bound of one patient's gradient in a DP-SGD step."""
    noise_multiplier: Annotated[float, Finite, Field(ge=0, le=DP_MAX_NOISE)] = Field(
        default=0.0,
        json_schema_extra=_hint("0: derive it from dp.target-epsilon"),
    )
    """σ (site level: noise std = σ·clipping-norm / sites; record level: σ·max-grad-norm per
    step). 0: the smallest σ that reaches target-epsilon (record level: at each site)."""
    target_epsilon: Annotated[float, Finite, Field(ge=DP_MIN_EPSILON, le=DP_MAX_EPSILON)] = 8.0
    delta: Annotated[float, Finite, Field(gt=0, lt=1)] = 1e-5

    @property
    def site_level(self) -> bool:
        return self.enabled and self.level == "site"

    @property
    def record_level(self) -> bool:
        return self.enabled and self.level == "record"


Rate = Annotated[float, Finite, Field(gt=0, le=10)]
Beta = Annotated[float, Finite, Field(ge=0, lt=1)]


class FedAdamConfig(Settings):
    eta: Rate = 1e-3
    eta_l: Rate = 1e-3
    beta_1: Beta = 0.9
    beta_2: Beta = 0.99
    tau: Annotated[float, Finite, Field(gt=0, le=1)] = 1e-9


class FedAvgMConfig(Settings):
    """FedAvg with server momentum (Hsu et al. 2019): v ← β·v + Δ, w ← w − η·v, where Δ is the
    global weights minus the sites' weighted mean."""

    server_lr: Rate = defaults.SERVER_LR
    momentum: Beta = defaults.SERVER_MOMENTUM


class FederationConfig(Settings):
    """Everything the coordinator decides for a federated target stage."""

    init: Text = ""  # the bridge bundle the federation starts from
    labels: Text = ""
    """The target's labels, comma-separated (empty: the bridge bundle's). Rows of labels the
    bridge has are carried by name, new labels start fresh (``shared.models.retarget``)."""
    intensity: Literal[("", *defaults.INTENSITIES)] = ""  # type: ignore[valid-type]
    """Intensity normalisation of the target (``none`` | ``clahe``; empty: the bridge bundle's),
    written into the spec every site preprocesses by."""
    out: Text = "runs/federated/model"  # final (best) bundle; rounds go to OUT-rounds/
    val_data: Text = ""  # optional server-side validation set for best-model selection
    test_data: Text = ""  # optional server-side test set, assessed once at the end
    simulation_sites: Text = ""  # comma-separated site folders for `flwr run .` in simulation
    num_server_rounds: Annotated[int, Whole, Field(ge=1, le=10_000)] = defaults.ROUNDS
    strategy: Literal[STRATEGIES] = defaults.STRATEGY  # type: ignore[valid-type]
    fraction_train: Annotated[float, Finite, Field(gt=0, le=1)] = 1.0
    fraction_evaluate: Fraction = 1.0
    min_available_sites: Sites = 2
    """The sites expected: each round waits for this many to be connected (within a deadline)."""
    min_train_sites: Sites = quorum(2)
    """The quorum: a round needs this many usable updates, else the run stops (resumable)."""
    min_evaluate_sites: Annotated[int, Whole, Field(ge=0, le=100_000)] = quorum(2)
    """Federated validation metrics need this many replies, else the round has none."""
    join_timeout: Seconds = defaults.JOIN_TIMEOUT
    """Seconds the first round waits for the expected sites; then it goes on with a quorum."""
    site_wait_timeout: Seconds = defaults.SITE_WAIT_TIMEOUT
    """The same wait before every later training and evaluation (a lost site costs this)."""
    round_timeout: Seconds = defaults.ROUND_TIMEOUT
    local: LocalSettings = Field(default_factory=LocalSettings, json_schema_extra=INLINE)
    """What every site does each round (keys ``lr``, ``local-epochs``… at the top level)."""
    fedadam: FedAdamConfig = Field(default_factory=FedAdamConfig)
    fedavgm: FedAvgMConfig = Field(default_factory=FedAvgMConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    secure_aggregation: Flag = False
    """The coordinator sees only the sum of the sites' updates (``server.secagg``)."""
    secure_aggregation_clip: Annotated[float, Finite, Field(gt=0, le=1000)] = Field(
        default=8.0,
        json_schema_extra=_hint("the largest |weight change| a site's update may carry"),
    )
    """Per-weight range ±clip of an update under secure aggregation (fixed-point quantised)."""

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        """Rules across settings (each field's own bound is declared with it)."""
        secagg_ok = (
            self.strategy in ("fedavg", "fedprox")
            and self.min_train_sites >= 2
            and self.fraction_train == 1
            and not self.dp.site_level
        )
        rules = {
            "min-train-sites": self.min_train_sites <= self.min_available_sites,
            "min-evaluate-sites": self.min_evaluate_sites <= self.min_available_sites,
            "dp.enabled": not (self.dp.site_level and self.strategy in ("fedadam", "fedavgm")),
            "proximal-mu": not (self.dp.record_level and self.strategy == "fedprox"),
            "balanced": not (self.dp.record_level and self.local.balanced),
            "secure-aggregation": not self.secure_aggregation or secagg_ok,
        }
        bad = next((k for k, ok in rules.items() if not ok), None)
        if bad is not None:
            raise ConfigError(
                f"run config: invalid value for {bad!r} ({self.to_flat()[bad]!r}){_HINTS[bad]}"
            )
        return self

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
        return self.local.replace(proximal_mu=0.0)

    def to_flat(self) -> dict[str, Any]:
        """Dotted kebab-case keys, as in ``[tool.flwr.app.config]``."""
        return to_flat(self)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> FederationConfig:
        return from_flat(cls, flat)


_PATH_KEYS = ("init", "out", "val-data", "test-data")


def merge_overrides(
    flat: Mapping[str, Any], overrides: Mapping[str, str], *, given: Mapping[str, str]
) -> dict[str, Any]:
    """``flat`` (a command's options as run-config keys) with its ``--set`` overrides.

    ``given`` maps the keys whose option the user typed to that option (``"out"`` →
    ``"--out"``): an override of such a key must agree with the option, or it is refused
    (``--out A --set out=B`` would otherwise write to B without a word).
    """
    known = flat_fields(FederationConfig)
    for key, value in overrides.items():
        if key not in given or key not in flat or key not in known:
            continue
        if _setting(key, flat[key]) != _setting(key, value):
            raise ConfigError(
                f"--set {key}={value} disagrees with {given[key]} {flat[key]}: set it once"
            )
    return {**flat, **overrides}


def _setting(key: str, value: Any) -> Any:
    if key in _PATH_KEYS:
        return str(Path(str(value)).resolve()) if str(value) else ""
    return coerce(FederationConfig, key, value)
