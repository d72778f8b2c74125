"""ModelSpec and the model bundle: a folder with ``model.safetensors`` and ``model.json``.

Everything after training reads only the bundle: the spec carries what preprocessing needs
(input size, channels, mean/std, labels), so no later step repeats or guesses a flag.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedbridge_shared import __version__
from fedbridge_shared.data.pixels import FALLBACK_MEAN, FALLBACK_STD
from fedbridge_shared.defaults import INTENSITIES
from fedbridge_shared.errors import BundleError
from fedbridge_shared.files import atomic_dir, max_model_bytes, read_regular, strict_json
from fedbridge_shared.layout import SPEC_FILE, WEIGHTS_FILE
from fedbridge_shared.modality import MODALITIES

BUNDLE_FORMAT = "fedbridge-bundle/2"
"""Format 2: ``seal`` covers the weights and the canonical spec (format 1 hashed weights only)."""

IMAGE_SIZE_RANGE = (16, 1024)
TIMM_KWARGS = {"pad_type": str, "drop_rate": float, "drop_path_rate": float}
"""The only timm kwargs a bundle may carry: a file path (``checkpoint_path``), ``pretrained`` or
an arbitrary constructor argument would let a model.json make timm read files."""


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a model and feed it: timm arch, labels and preprocessing."""

    arch: str
    labels: tuple[str, ...]
    image_size: int
    in_chans: int = 3
    mean: tuple[float, ...] = FALLBACK_MEAN
    std: tuple[float, ...] = FALLBACK_STD
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)
    """Provenance of the starting weights: kind (none|imagenet|file|bundle), source, sha256."""
    intensity: str = "none"
    """Intensity normalisation before mean/std (``none`` | ``clahe``, ``data.pixels.intensity``);
    left out of model.json when ``none``, so older bundles (and their seals) read unchanged."""
    modality: str = "other"
    """What the model reads (``cxr`` | ``oct`` | ``other``), set at bridge/train and inherited:
    TTA, augmentation defaults and the bedside use it, never the label names. Left out of
    model.json when ``other``, so older bundles (and their seals) read unchanged."""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.intensity == "none":
            del d["intensity"]
        if self.modality == "other":
            del d["modality"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        if not isinstance(d, dict) or not isinstance(d.get("labels"), list | tuple):
            raise BundleError("model spec must be an object with a list of labels")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise BundleError(f"model spec has unknown keys: {', '.join(sorted(unknown))}")
        try:
            return cls(
                arch=str(d["arch"]),
                labels=tuple(str(x) for x in d["labels"]),
                image_size=int(d["image_size"]),
                in_chans=int(d.get("in_chans", 3)),
                mean=tuple(float(x) for x in d.get("mean", FALLBACK_MEAN)),
                std=tuple(float(x) for x in d.get("std", FALLBACK_STD)),
                timm_kwargs=dict(d.get("timm_kwargs", {})),
                init=dict(d.get("init", {})),
                intensity=str(d.get("intensity", "none")),
                modality=str(d.get("modality", "other")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"model spec is incomplete or malformed: {e!r}") from e


def _validate(spec: ModelSpec) -> None:
    """The one schema every reader relies on; a bad value is a BundleError naming the field."""
    labels = spec.labels
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(x.strip() for x in labels):
        raise BundleError(f"model spec: labels must be ≥ 2 distinct non-empty names, got {labels}")
    if not spec.arch or not all(c.isalnum() or c in "_.-" for c in spec.arch):
        raise BundleError(f"model spec: arch {spec.arch!r} is not a timm model name")
    low, high = IMAGE_SIZE_RANGE
    if not low <= spec.image_size <= high:
        raise BundleError(f"model spec: image_size {spec.image_size} outside [{low}, {high}]")
    if spec.in_chans not in (1, 3):
        raise BundleError(f"model spec: in_chans {spec.in_chans} (must be 1 or 3)")
    for name in ("mean", "std"):
        values = getattr(spec, name)
        if len(values) < spec.in_chans or not all(math.isfinite(v) for v in values):
            raise BundleError(f"model spec: {name} {list(values)} must be {spec.in_chans} finite")
    if not all(v > 0 for v in spec.std):
        raise BundleError(f"model spec: std {list(spec.std)} must be > 0")
    if spec.intensity not in INTENSITIES:
        allowed = " | ".join(INTENSITIES)
        raise BundleError(f"model spec: intensity {spec.intensity!r} (must be {allowed})")
    if spec.modality not in MODALITIES:
        raise BundleError(
            f"model spec: modality {spec.modality!r} (must be {' | '.join(MODALITIES)})"
        )
    check_timm_kwargs(spec.timm_kwargs)


def check_timm_kwargs(timm_kwargs: dict[str, Any]) -> None:
    """Refuse (BundleError) any kwarg outside :data:`TIMM_KWARGS` or of the wrong type."""
    for key, value in timm_kwargs.items():
        kind = TIMM_KWARGS.get(key)
        if kind is None:
            allowed = ", ".join(sorted(TIMM_KWARGS))
            raise BundleError(f"model spec: timm_kwargs {key!r} not allowed (only {allowed})")
        if not isinstance(value, kind) or (isinstance(value, float) and not math.isfinite(value)):
            raise BundleError(f"model spec: timm_kwargs {key}={value!r} must be {kind.__name__}")


def seal_of(spec: ModelSpec, weights_sha256: str) -> str:
    """sha256 over the canonical spec (labels, preprocessing, arch) and the weights' sha256."""
    canonical = json.dumps(
        {"format": BUNDLE_FORMAT, "spec": spec.to_dict(), "weights_sha256": weights_sha256},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: spec, weights and the free-form record of how it was made."""

    path: Path
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    sha256: str
    training: dict[str, Any]
    metrics: dict[str, Any]


def save_bundle(
    out: Path,
    spec: ModelSpec,
    state_dict: dict[str, torch.Tensor],
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle atomically: build it in a temp folder beside ``out``, then rename."""
    out = Path(out)
    if out.exists() and not (out / SPEC_FILE).exists() and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not a fedbridge bundle; choose another --out")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    data = save_safetensors(tensors)
    weights_sha = hashlib.sha256(data).hexdigest()
    text = _record_text(out, spec, weights_sha, training, metrics)
    try:
        with atomic_dir(out, replace=True) as tmp:
            (tmp / WEIGHTS_FILE).write_bytes(data)
            (tmp / SPEC_FILE).write_text(text)
    except OSError as e:  # a full disk, a read-only folder: nothing is left behind
        raise BundleError(f"{out}: cannot write the bundle ({e.strerror or e})") from e
    return out


def _record_text(
    out: Path,
    spec: ModelSpec,
    weights_sha: str,
    training: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
) -> str:
    """model.json's text: strict JSON (a NaN loss is refused by name, never written)."""
    record = {
        "format": BUNDLE_FORMAT,
        "fedbridge_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights_sha256": weights_sha,
        "seal": seal_of(spec, weights_sha),
        "spec": spec.to_dict(),
        "training": training or {},
        "metrics": metrics or {},
    }
    return strict_json(record, where=str(out / SPEC_FILE), indent=2, default=str) + "\n"


def read_bundle_record(path: Path) -> dict[str, Any]:
    """Read and validate ``model.json`` of a bundle folder (no weights)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle folder (expected {SPEC_FILE} + {WEIGHTS_FILE})")
    spec_path = path / SPEC_FILE
    if not spec_path.is_file():
        raise BundleError(f"{spec_path}: missing; not a fedbridge bundle")
    try:
        record = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleError(f"{spec_path}: unreadable JSON ({str(e)[:200]})") from e
    if not isinstance(record, dict) or record.get("format") != BUNDLE_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        if found == "fedbridge-bundle/1":
            raise BundleError(
                f"{spec_path}: a fedbridge-bundle/1 file, whose labels and preprocessing are not "
                "sealed; retrain it with this version"
            )
        raise BundleError(f"{spec_path}: not a {BUNDLE_FORMAT} file")
    if not isinstance(record.get("spec"), dict):
        raise BundleError(f"{spec_path}: 'spec' must be an object")
    return record


def load_bundle(path: Path) -> Bundle:
    """Load a bundle, refusing weights whose sha256 differs from the one in ``model.json``."""
    path = Path(path)
    record = read_bundle_record(path)
    try:
        spec = ModelSpec.from_dict(record["spec"])
    except BundleError as e:
        raise BundleError(f"{path / SPEC_FILE}: {e}") from e
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise BundleError(f"{weights}: missing")
    # One read serves both the hash check and the tensors: no gap between checking and using,
    # and no memory map a later in-place edit of the file could change behind our back. Its
    # kind and size are checked first: a FIFO, /dev/zero or a huge sparse file is never read.
    try:
        data = read_regular(weights, limit=max_model_bytes())
    except OSError as e:
        raise BundleError(f"{weights}: unreadable ({e.strerror})") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.get("weights_sha256"):
        raise BundleError(
            f"{weights}: sha256 {digest[:12]}… does not match model.json "
            f"({str(record.get('weights_sha256'))[:12]}…); the file was modified or corrupted"
        )
    if record.get("seal") != seal_of(spec, digest):
        raise BundleError(
            f"{path / SPEC_FILE}: the spec (labels, input size, mean/std, arch) was changed "
            "after the bundle was written (seal mismatch); refusing it"
        )
    try:
        state = load_safetensors(data)
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{weights}: unreadable safetensors file ({e})") from e
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BundleError(f"{weights}: tensor {name} contains NaN or Inf")
    return Bundle(
        path=path,
        spec=spec,
        state_dict=state,
        sha256=digest,
        training=dict(record.get("training", {})),
        metrics=dict(record.get("metrics", {})),
    )


def is_bundle(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / SPEC_FILE).is_file()
