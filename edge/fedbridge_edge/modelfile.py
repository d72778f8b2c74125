"""The edge model file: an ONNX graph carrying its bundle record and a content hash.

Integrity design. A file cannot contain its own sha256, so the hash stored in
``metadata_props["fedbridge.sha256"]`` is the sha256 of the deterministic protobuf serialisation
of the model *with that one entry removed*: it covers the graph, every weight, the embedded
model.json, the OOD threshold and the other metadata. A loader parses the file, removes the entry,
re-serialises and compares. This needs no sidecar that could be lost or copied separately; it
detects corruption and edits, not a deliberate forger (who could recompute it) — sign the file
(e.g. with the hospital's key) if that is in the threat model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from fedbridge_edge.errors import EdgeError, IntegrityError

FORMAT = "fedbridge-onnx/1"
KEY_FORMAT = "fedbridge.format"
KEY_RECORD = "fedbridge.model_json"
KEY_EDGE = "fedbridge.edge"
KEY_SHA = "fedbridge.sha256"
OUTPUTS = ("logits", "cam", "ood_score")


@dataclass(frozen=True)
class EdgeModel:
    """A verified model file: raw bytes for the runtime plus the parsed metadata."""

    path: Path
    data: bytes
    sha256: str
    record: dict[str, Any]
    edge: dict[str, Any]

    @property
    def spec(self) -> dict[str, Any]:
        return self.record["spec"]

    @property
    def labels(self) -> list[str]:
        return list(self.spec["labels"])


def content_sha256(model: onnx.ModelProto) -> str:
    """sha256 of the model serialised without its ``fedbridge.sha256`` entry."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = [p for p in copy.metadata_props if p.key != KEY_SHA]
    del copy.metadata_props[:]
    copy.metadata_props.extend(keep)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def seal(model: onnx.ModelProto, record: dict[str, Any], edge: dict[str, Any]) -> bytes:
    """Set the fedbridge metadata on ``model`` and return its bytes with the content hash."""
    props = {p.key: p.value for p in model.metadata_props if not p.key.startswith("fedbridge.")}
    props.update(
        {
            KEY_FORMAT: FORMAT,
            KEY_RECORD: json.dumps(record, sort_keys=True, default=str),
            KEY_EDGE: json.dumps(edge, sort_keys=True, default=str),
        }
    )
    onnx.helper.set_model_props(model, props)
    digest = content_sha256(model)  # before adding the entry it must not cover
    entry = model.metadata_props.add()
    entry.key, entry.value = KEY_SHA, digest
    return model.SerializeToString(deterministic=True)


def read_edge_model(path: Path) -> EdgeModel:
    """Read and verify an edge ONNX file; refuses files without metadata or with a bad hash."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgeError(f"{path}: cannot read model file ({e.strerror or e})") from e
    return parse_edge_model(data, path)


def parse_edge_model(data: bytes, path: Path) -> EdgeModel:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError and others
        raise IntegrityError(f"{path}: not an ONNX model (truncated or corrupt)") from e
    if not model.graph.node:
        raise IntegrityError(f"{path}: not an ONNX model (no graph)")
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(KEY_FORMAT) != FORMAT or KEY_SHA not in props:
        raise EdgeError(
            f"{path}: ONNX file without fedbridge metadata; export it with "
            "`fedbridge export onnx BUNDLE --out FILE`"
        )
    digest = content_sha256(model)
    if digest != props[KEY_SHA]:
        raise IntegrityError(
            f"{path}: content sha256 {digest[:12]}… does not match the one recorded at export "
            f"({props[KEY_SHA][:12]}…); the file was modified or corrupted — refusing to run it"
        )
    try:
        record, edge = json.loads(props[KEY_RECORD]), json.loads(props[KEY_EDGE])
        record["spec"]["labels"], record["spec"]["image_size"]  # noqa: B018
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise EdgeError(f"{path}: fedbridge metadata is malformed ({e!r})") from e
    return EdgeModel(path=path, data=data, sha256=digest, record=record, edge=edge)
