"""Every training setting, declared once: pydantic models whose fields carry their bounds.

:class:`TrainConfig` (a central stage), :class:`LocalSettings` (what a site does each round)
and the federation's run config (``fedbridge_server.config.FederationConfig``) build their
fields from the bounded types below, so a batch size is bounded the same wherever it is given.
The flat dotted kebab-case keys of ``--set`` and ``[tool.flwr.app.config]`` are derived from the
field names (:func:`flat_fields`); a refused value becomes one line naming the key, the value and
the bound (:func:`refusal`), never a pydantic dump.
"""

from __future__ import annotations

import contextvars
import math
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import annotated_types as at
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    Strict,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from typing_extensions import Self

from fedbridge_shared import defaults
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.modality import MODALITIES


def kebab(name: str) -> str:
    return name.replace("_", "-")


def _whole(value: Any) -> Any:
    """An int from ``"1e3"`` or ``2.0`` (finite and whole); anything else is left to pydantic."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
    if isinstance(number, float) and math.isfinite(number) and number == int(number):
        return int(number)
    return value


def _truth(value: Any) -> Any:
    """``"true"``/``"false"`` from a command line or TOML (a round config sends real bools)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _text(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


Whole = BeforeValidator(_whole)
Finite = Field(allow_inf_nan=False)
Flag = Annotated[bool, Strict(), BeforeValidator(_truth)]
Text = Annotated[str, BeforeValidator(_text)]

# The bounds of the recipe, shared by a central stage and a federated site.
Epochs = Annotated[int, Whole, Field(ge=1, le=1000)]
BatchSize = Annotated[int, Whole, Field(ge=1, le=4096)]
LearningRate = Annotated[float, Finite, Field(gt=0, le=1)]
WeightDecay = Annotated[float, Finite, Field(ge=0, le=1)]
Patience = Annotated[int, Whole, Field(ge=1, le=1000)]
ValFraction = Annotated[float, Finite, Field(ge=0, le=0.5)]
AugmentPerSample = Annotated[int, Whole, Field(ge=0, le=100)]
AugmentPreset = Literal[defaults.AUGMENT_PRESETS]  # type: ignore[valid-type]
LabelSmoothing = Annotated[float, Finite, Field(ge=0, lt=1)]
Seed = Annotated[int, Whole, Field(ge=0, lt=2**32)]
EmaDecay = Annotated[float, Finite, Field(ge=0, lt=1)]
BackboneLrScale = Annotated[float, Finite, Field(gt=0, le=1)]
IntensityName = Literal[defaults.INTENSITIES]  # type: ignore[valid-type]
ModalityName = Literal[MODALITIES]  # type: ignore[valid-type]
ProximalMu = Annotated[float, Finite, Field(ge=0, le=1000)]
Threads = Annotated[int, Whole, Field(ge=0, le=1024)]

_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("settings_depth", default=0)

INLINE: dict[str, Any] = {"inline": True}
"""``json_schema_extra`` of a sub-model whose keys sit at the top level of the flat keys."""


class Settings(BaseModel):
    """Frozen, no unknown keys; a refused value raises one :class:`ConfigError` line."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    options: ClassVar[bool] = False
    """True: errors name the command-line option (``--batch-size``), else the run-config key."""

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        """Outermost model only: its problem as one line (nested models' errors carry their
        place in the outer model, so the key is named in full: ``dp.level``)."""
        outermost = _DEPTH.get() == 0
        token = _DEPTH.set(_DEPTH.get() + 1)
        try:
            return handler(data)
        except ValidationError as e:
            if not outermost:
                raise
            raise refusal(e, cls) from None
        finally:
            _DEPTH.reset(token)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated again."""
        return type(self)(**{**self.model_dump(), **changes})

    @classmethod
    def default(cls, name: str) -> Any:
        """A field's default (what the CLI option of the same setting defaults to)."""
        return cls.model_fields[name].get_default(call_default_factory=True)

    @classmethod
    def bound(cls, name: str) -> str:
        """A field's bound in words, e.g. ``in [1, 4096]`` (``""`` when it has none)."""
        return _bound(cls.model_fields[name])


M = TypeVar("M", bound=Settings)


def _submodel(annotation: Any) -> type[Settings] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Settings) else None


def _inline(f: FieldInfo) -> bool:
    return isinstance(f.json_schema_extra, dict) and bool(f.json_schema_extra.get("inline"))


def flat_fields(model: type[Settings]) -> dict[str, tuple[str, ...]]:
    """Flat dotted kebab-case key → attribute path (``dp.noise-multiplier`` → ``(dp,
    noise_multiplier)``); an inline sub-model's keys sit at the top level."""
    out: dict[str, tuple[str, ...]] = {}
    for name, f in model.model_fields.items():
        sub = _submodel(f.annotation)
        if sub is None:
            out[kebab(name)] = (name,)
            continue
        prefix = "" if _inline(f) else kebab(name) + "."
        out.update({prefix + key: (name, *path) for key, path in flat_fields(sub).items()})
    return out


def _tables(model: type[Settings]) -> set[str]:
    return {
        kebab(n)
        for n, f in model.model_fields.items()
        if _submodel(f.annotation) is not None and not _inline(f)
    }


def to_flat(obj: Settings) -> dict[str, Any]:
    """``obj`` as flat dotted kebab-case keys, as in ``[tool.flwr.app.config]``."""
    out = {}
    for key, path in flat_fields(type(obj)).items():
        value: Any = obj
        for part in path:
            value = getattr(value, part)
        out[key] = value
    return out


def _expand(model: type[Settings], flat: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables (``[dp]``) as dotted keys; a plain value where a table belongs is
    refused."""
    out: dict[str, Any] = {}
    tables = _tables(model)
    for raw, value in flat.items():
        key = prefix + str(raw)
        if key.split(".")[0] in tables and "." not in key:
            if not isinstance(value, Mapping):
                raise ConfigError(f"run config: {key!r} must be a table of settings")
            out.update(_expand(model, value, key + "."))
        else:
            out[key] = value
    return out


def from_flat(model: type[M], flat: Mapping[str, Any]) -> M:
    """The model from flat dotted kebab-case keys; an unknown key is refused by name."""
    known = flat_fields(model)
    tree: dict[str, Any] = {}
    for key, value in _expand(model, flat).items():
        if key not in known:
            raise ConfigError(f"run config: unknown key {key!r}")
        *parents, leaf = known[key]
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return model(**tree)


def coerce(model: type[Settings], key: str, value: Any) -> Any:
    """One flat key's value as the model would hold it (``"1.0"`` → 1 for an int), refused in
    the model's one-line form when it cannot be."""
    path = flat_fields(model)[key]
    owner: type[Settings] = model
    for part in path[:-1]:
        sub = _submodel(owner.model_fields[part].annotation)
        assert sub is not None
        owner = sub
    f = owner.model_fields[path[-1]]

    try:
        annotated: Any = (
            Annotated.__class_getitem__((f.annotation, *f.metadata))  # type: ignore[attr-defined]  # runtime-built Annotated[T, *bounds]
            if f.metadata
            else f.annotation  # a plain Literal or type: nothing to annotate
        )
        return TypeAdapter(annotated).validate_python(value)
    except ValidationError as e:
        raise ConfigError(_line(e.errors(include_url=False)[0], f, key, options=False)) from None


def check(model: type[Settings], name: str, value: Any) -> None:
    """Refuse ``value`` for ``model``'s field ``name`` by its declared bound (for functions that
    take one setting outside a model, e.g. ``engine.make_optimizer``)."""
    model(**{name: value})


# ------------------------------------------------------------------ one-line refusals

_TYPE_ERRORS = {
    "int_parsing": "int", "int_type": "int", "int_from_float": "int",
    "float_parsing": "float", "float_type": "float",
    "bool_parsing": "bool", "bool_type": "bool", "string_type": "str",
    "model_type": "table", "dict_type": "table", "model_attributes_type": "table",
}  # fmt: skip


def refusal(error: ValidationError, model: type[Settings]) -> ConfigError:
    """The first problem of ``error`` as one line naming the key, the value and the bound."""
    problem = error.errors(include_url=False)[0]
    key, f = _located(model, problem["loc"])
    return ConfigError(_line(problem, f, key, options=model.options))


def _located(model: type[Settings], loc: tuple[Any, ...]) -> tuple[str, FieldInfo | None]:
    owner: type[Settings] | None = model
    prefix, f = "", None
    for part in loc:
        name = _field_name(owner, str(part)) if owner is not None else None
        if owner is None or name is None:
            return prefix + kebab(str(part)), None
        f = owner.model_fields[name]
        part = name
        sub = _submodel(f.annotation)
        if sub is None:
            return prefix + kebab(str(part)), f
        if not _inline(f):
            prefix += kebab(str(part)) + "."
        owner = sub
    return prefix.rstrip("."), f


def _field_name(model: type[Settings], given: str) -> str | None:
    """The field ``given`` names, by its name or a former one (``preset`` → ``augment``)."""
    for name, f in model.model_fields.items():
        aliases = f.validation_alias.choices if isinstance(f.validation_alias, AliasChoices) else []
        if given == name or given in aliases:
            return name
    return None


def _line(problem: Any, f: FieldInfo | None, key: str, *, options: bool) -> str:
    kind, value = problem["type"], problem["input"]
    if kind == "extra_forbidden":
        return f"--{key}: no such setting" if options else f"run config: unknown key {key!r}"
    expected = _TYPE_ERRORS.get(kind)
    if expected == "table":
        return f"run config: {key!r} must be a table of settings"
    if expected is not None:
        if options:
            return f"--{key} {value!r}: must be {expected}"
        text = str(value) if len(str(value)) <= 40 else str(value)[:37] + "..."
        finite = " (finite)" if expected == "int" else ""
        return f"run config: {key!r} must be {expected}{finite}, got {text!r}"
    value = _shown(value, f)
    hint = f.json_schema_extra.get("hint") if f and isinstance(f.json_schema_extra, dict) else None
    bound = f"must be {_bound(f)}" if f is not None else problem["msg"]
    if options:
        return f"--{key} {value!r}: {bound}" + (f" ({hint})" if hint else "")
    if hint and f is not None and _choices(f.annotation):
        bound = hint  # the hint explains each choice
    elif hint:
        bound += f" ({hint})"
    return f"run config: invalid value for {key!r} ({value!r}): {bound}"


def _shown(value: Any, f: FieldInfo | None) -> Any:
    """The value as the field would hold it (``"0"`` → 0 for an int, 0 → 0.0 for a float)."""
    if f is None or isinstance(value, bool):
        return value
    if f.annotation is int:
        return _whole(value)
    if f.annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    return value


def _number(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _choices(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [c for arg in typing.get_args(annotation) for c in _choices(arg)]


def _attr(bound: Any) -> str:
    return type(bound).__name__.lower()  # at.Ge(ge=1).ge


def _bound(f: FieldInfo | None) -> str:
    if f is None:
        return ""
    choices = _choices(f.annotation)
    if choices:
        return "one of " + ", ".join(str(c) if c != "" else '""' for c in choices)
    low = high = None
    for m in f.metadata:
        if isinstance(m, at.Ge | at.Gt):
            low = ("[" if isinstance(m, at.Ge) else "(", _number(getattr(m, _attr(m))))
        if isinstance(m, at.Le | at.Lt):
            high = (_number(getattr(m, _attr(m))), "]" if isinstance(m, at.Le) else ")")
    if low and high:
        return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return ("≥ " if low[0] == "[" else "> ") + low[1]
    if high:
        return ("≤ " if high[1] == "]" else "< ") + high[0]
    return "valid"


# ------------------------------------------------------------------ the two recipe models


class TrainConfig(Settings):
    """Settings of one training stage; saved in the bundle as the resolved config."""

    options: ClassVar[bool] = True

    epochs: Epochs = defaults.EPOCHS
    batch_size: BatchSize = defaults.BATCH_SIZE
    lr: LearningRate = defaults.LR
    weight_decay: WeightDecay = defaults.WEIGHT_DECAY
    patience: Patience = defaults.PATIENCE
    val_fraction: ValFraction = defaults.VAL_FRACTION
    augment_per_sample: AugmentPerSample = defaults.BRIDGE_AUGMENT_PER_SAMPLE
    online_augment: Flag = True
    augment: AugmentPreset | None = Field(
        default=defaults.AUGMENT, validation_alias=AliasChoices("augment", "preset")
    )
    """The augmentation preset; None: the stage's modality's (``cxr``/``oct``), else the default.
    ``preset`` is its former name, still read (bundles written before 2025-06 carry it)."""
    label_smoothing: LabelSmoothing = defaults.LABEL_SMOOTHING
    seed: Seed = defaults.SEED
    ema_decay: EmaDecay = Field(default=defaults.EMA_DECAY, json_schema_extra={"hint": "0: off"})
    balanced: Flag = defaults.BALANCED
    backbone_lr_scale: BackboneLrScale = Field(
        default=defaults.BACKBONE_LR_SCALE, json_schema_extra={"hint": "1: one learning rate"}
    )
    """Every layer but the classifier at this fraction of ``lr`` (discriminative LRs)."""
    intensity: IntensityName | None = None
    """``none`` | ``clahe``, recorded in the spec; None: the init bundle's (``none`` for others)."""
    modality: ModalityName | None = None
    """``cxr`` | ``oct`` | ``other``, sealed in the spec; None: the init bundle's, else the
    augmentation preset's (``modality.modality_for_stage``)."""

    @property
    def preset(self) -> str | None:
        """Deprecated name of :attr:`augment`."""
        return self.augment


class LocalSettings(Settings):
    """What the server asks every site to do in a round (sent as kebab-case config keys)."""

    local_epochs: Epochs = defaults.LOCAL_EPOCHS
    batch_size: BatchSize = defaults.BATCH_SIZE
    lr: LearningRate = defaults.LR
    weight_decay: WeightDecay = defaults.WEIGHT_DECAY
    augment_per_sample: AugmentPerSample = defaults.TARGET_AUGMENT_PER_SAMPLE
    augment: AugmentPreset = defaults.AUGMENT
    val_fraction: ValFraction = defaults.VAL_FRACTION
    label_smoothing: LabelSmoothing = defaults.LABEL_SMOOTHING
    seed: Seed = defaults.SEED
    proximal_mu: ProximalMu = defaults.PROXIMAL_MU
    ema_decay: EmaDecay = defaults.SITE_EMA_DECAY
    """EMA of the site's weights within its round (0: off); the site replies with the EMA."""
    balanced: Flag = defaults.BALANCED
    threads: Threads = 0
    """torch CPU threads while training (0: torch's default). Floating-point sums depend on the
    thread count, so bitwise-identical reruns need the same value on the same site."""

    def to_config(self) -> dict[str, Any]:
        return {kebab(k): v for k, v in self.model_dump().items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LocalSettings:
        """Pick this model's keys out of a round config (other keys are ignored); the values
        are taken as sent (a bool must be a bool)."""
        values = {n: config[kebab(n)] for n in cls.model_fields if kebab(n) in config}
        for name, value in values.items():
            if cls.model_fields[name].annotation is bool and not isinstance(value, bool):
                raise ConfigError(f"run config: {kebab(name)!r} must be true or false")
        return cls(**values)
