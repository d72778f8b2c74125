"""ModelSpec and the model bundle: a folder with ``model.safetensors`` and ``model.json``.

Everything after training reads only the bundle: the spec carries what preprocessing needs
(input size, channels, mean/std, labels), so no later step repeats or guesses a flag.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from fedbridge_shared import __version__
from fedbridge_shared.data.images import file_sha256
from fedbridge_shared.errors import BundleError
from fedbridge_shared.files import atomic_dir

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
BUNDLE_FORMAT = "fedbridge-bundle/1"


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a model and feed it: timm arch, labels and preprocessing."""

    arch: str
    labels: tuple[str, ...]
    image_size: int
    in_chans: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)
    """Provenance of the starting weights: kind (none|imagenet|file|bundle), source, sha256."""

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
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
                mean=tuple(float(x) for x in d.get("mean", (0.5, 0.5, 0.5))),
                std=tuple(float(x) for x in d.get("std", (0.5, 0.5, 0.5))),
                timm_kwargs=dict(d.get("timm_kwargs", {})),
                init=dict(d.get("init", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"model spec is incomplete or malformed: {e!r}") from e


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
    with atomic_dir(out, replace=True) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        record = {
            "format": BUNDLE_FORMAT,
            "fedbridge_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "weights_sha256": file_sha256(tmp / WEIGHTS_FILE),
            "spec": spec.to_dict(),
            "training": training or {},
            "metrics": metrics or {},
        }
        (tmp / SPEC_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return out


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{spec_path}: unreadable JSON ({e})") from e
    if not isinstance(record, dict) or record.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{spec_path}: not a {BUNDLE_FORMAT} file")
    return record


def load_bundle(path: Path) -> Bundle:
    """Load a bundle, refusing weights whose sha256 differs from the one in ``model.json``."""
    path = Path(path)
    record = read_bundle_record(path)
    spec = ModelSpec.from_dict(record.get("spec", {}))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{weights}: missing")
    # One read serves both the hash check and the tensors: no gap between checking and using,
    # and no memory map a later in-place edit of the file could change behind our back.
    try:
        data = weights.read_bytes()
    except OSError as e:
        raise BundleError(f"{weights}: unreadable ({e.strerror})") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.get("weights_sha256"):
        raise BundleError(
            f"{weights}: sha256 {digest[:12]}… does not match model.json "
            f"({str(record.get('weights_sha256'))[:12]}…); the file was modified or corrupted"
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
