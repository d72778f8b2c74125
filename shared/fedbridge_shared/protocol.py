"""The federation protocol: what the coordinator and a site send each other, defined once.

Both ends import these names; Flower's records (``ArrayRecord``, ``ConfigRecord``,
``MetricRecord``) are built from them in the two thin app files only.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from fedbridge_shared.errors import ConfigError, DataError
from fedbridge_shared.settings import LocalSettings, kebab

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10 (JetPack 6), as fedbridge.cli.options

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


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
        per_class: dict[str, Any] = {
            n: _per_class(metrics, _PER_CLASS[n]) for n in names & set(_PER_CLASS)
        }
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


# ------------------------------------------------ what a site may send: a closed schema

SITE_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""A site's name on the wire (``site join --name`` enforces the same)."""


class SiteErrorCode(StrEnum):
    """Why a site refused a task: the only failure text that leaves a site.

    The full message (file names, paths) stays on the site's console and log.
    """

    UNREADABLE_IMAGES = "unreadable_images"  # count: the files that cannot be decoded
    NO_IMAGES = "no_images"
    EMPTY_CLASS_FOLDER = "empty_class_folder"  # count: such folders
    LABELS_DIFFER = "labels_differ"  # the site's class folders are not the model's labels
    DATA_FOLDER = "data_folder"  # the data folder is missing or not class folders
    BAD_TASK = "bad_task"  # the coordinator's task is not fedbridge's schema
    UNKNOWN_APP = "unknown_app"  # a run whose app the site does not trust
    WORKER_DOWN = "worker_down"  # the site's worker is not running or stopped mid-task
    OUT_OF_MEMORY = "out_of_memory"
    INTERNAL = "internal_error"  # anything else; the site's log says what


_FAILURE = re.compile(r'\{"error": "[a-z_]{1,40}", "count": [0-9]{1,9}\}')


class SiteFailure(DataError):
    """A site's failure: ``code`` and ``count`` cross the wire, the message stays local."""

    def __init__(
        self, message: str, *, code: SiteErrorCode = SiteErrorCode.INTERNAL, count: int = 1
    ) -> None:
        super().__init__(message)
        self.code, self.count = SiteErrorCode(code), int(count)

    def wire(self) -> str:
        """``{"error": "unreadable_images", "count": 1}``: all the coordinator is told."""
        return json.dumps({"error": self.code.value, "count": self.count})


def as_failure(e: BaseException) -> SiteFailure:
    """Any exception of a site's task as a :class:`SiteFailure` (a code the wire may carry)."""
    if isinstance(e, SiteFailure):
        return e
    if isinstance(e, ConfigError):
        return SiteFailure(str(e), code=SiteErrorCode.BAD_TASK)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return SiteFailure(str(e), code=SiteErrorCode.OUT_OF_MEMORY)
    return SiteFailure(f"{type(e).__name__}: {e}")


def parse_failure(reason: str) -> tuple[SiteErrorCode, int] | None:
    """The (code, count) inside an error reason a site sent; None when it holds none.

    Flower wraps the ClientApp's exception text; only a well-formed object from the enum is
    accepted, so free text (a path, a name) never reaches a log or a report.
    """
    found = _FAILURE.search(str(reason)[:2000])
    if found is None:
        return None
    obj = json.loads(found.group(0))
    try:
        return SiteErrorCode(obj["error"]), int(obj["count"])
    except ValueError:
        return None


def describe_failure(reason: str) -> str:
    """A site's error reason as the coordinator may print it: a code and a count, never text."""
    parsed = parse_failure(reason)
    if parsed is None:
        return "site error (not in fedbridge's schema; details on the site's console)"
    code, count = parsed
    return f"{code.value}: {count}"


_METRIC_KEYS = {
    "train": {kebab(f.name) for f in fields(TrainReply)} - {"class-counts"},
    "evaluate": {kebab(f.name) for f in fields(EvalReply)} - {"class-counts", "class-correct"},
}
_PER_CLASS_KEYS = {
    "train": re.compile(r"class-count-[0-9]{1,4}"),
    "evaluate": re.compile(r"class-(count|correct)-[0-9]{1,4}"),
}
_RECORDS = {"train": {ARRAYS, METRICS, SITE}, "evaluate": {METRICS, SITE}}
SECAGG_RECORD = "secagg"
"""The one record of a secure-aggregation reply (keys, encrypted shares, revealed secrets)."""
SECAGG_QUERIES = ("query.secagg_setup", "query.secagg_share", "query.secagg_unmask")
SECAGG_TRAIN = "train.secagg"
_SECAGG_KEY = re.compile(r"[a-z]{1,16}(-([a-z]{1,16}|[0-9]{1,24}))?")
_SECAGG_MAX_BYTES = 4096
_SECAGG_METRICS = {"secagg-clipped"}


def _secagg_problem(items: dict[str, Any]) -> str | None:
    for key, value in items.items():
        if not _SECAGG_KEY.fullmatch(key):
            return "a secure-aggregation key not in the schema"
        if not isinstance(value, bytes) or len(value) > _SECAGG_MAX_BYTES:
            return "a secure-aggregation value that is not a short byte string"
    return None


def reply_problem(kind: str, records: dict[str, dict[str, Any]]) -> str | None:
    """Why a site's reply is not fedbridge's schema (None when it is).

    The answer never repeats what the site sent (it could be a name).
    ``records`` maps record names to their items (arrays by name only). A reply holds exactly
    the records of its kind; metric keys and values are the numbers of
    :class:`TrainReply`/:class:`EvalReply`; the site record holds one name matching
    :data:`SITE_NAME_PATTERN`; the arrays record holds the one packed :data:`WEIGHTS`.
    """
    if kind in SECAGG_QUERIES:  # keys, encrypted shares, revealed secrets: bytes only
        if set(records) != {SECAGG_RECORD}:
            return "records not those of a secure-aggregation reply"
        return _secagg_problem(records[SECAGG_RECORD])
    extra = _SECAGG_METRICS if kind == SECAGG_TRAIN else set()
    kind = "train" if kind == SECAGG_TRAIN else kind
    if kind not in _RECORDS:
        return "message type not train or evaluate"
    if set(records) != _RECORDS[kind]:
        return "records not those of a fedbridge reply"
    for key, value in records[METRICS].items():
        known = key in _METRIC_KEYS[kind] or key in extra
        if not known and not _PER_CLASS_KEYS[kind].fullmatch(key):
            return "a metric key not in the schema"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "a metric that is not a number"
    if NUM_EXAMPLES not in records[METRICS]:
        return f"no {NUM_EXAMPLES!r}"
    site = records[SITE]
    name = site.get(SITE_NAME)
    if set(site) != {SITE_NAME} or not isinstance(name, str):
        return "site record"
    if not SITE_NAME_PATTERN.fullmatch(name):
        return "site name"
    if kind == "train" and list(records[ARRAYS]) != [WEIGHTS]:
        return "arrays"
    return None


TASK_KEYS = frozenset(
    {
        *(kebab(name) for name in LocalSettings.model_fields),
        *(DP_SGD + kebab(f.name) for f in fields(RecordDP)),
        SPEC_JSON, SERVER_ROUND, NUM_ROUNDS,
    }
)  # fmt: skip
"""Every key of a round task's config: a site's worker answers nothing else."""


def task_problem(header: Any, arrays: Sequence[str]) -> str | None:
    """Why a task handed to a site's worker is not fedbridge's schema (None when it is)."""
    if not isinstance(header, dict) or set(header) != {"kind", "config"}:
        return "the header is not {kind, config}"
    if header["kind"] not in ("train", "evaluate"):
        return "the kind is not train or evaluate"
    config = header["config"]
    if not isinstance(config, dict) or not set(config) <= TASK_KEYS:
        return "config keys outside the round task"
    if not {SPEC_JSON, SERVER_ROUND} <= set(config):
        return "no model spec or round"
    if list(arrays) != [WEIGHTS]:
        return f"arrays other than one packed {WEIGHTS!r}"
    return None
