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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from fedbridge_edge.errors import EdgeError, IntegrityError
from fedbridge_shared.files import max_model_bytes, read_regular

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
        spec: dict[str, Any] = self.record["spec"]
        return spec

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
    sealed: bytes = model.SerializeToString(deterministic=True)
    return sealed


def read_edge_model(path: Path) -> EdgeModel:
    """Read and verify an edge ONNX file; refuses files without metadata or with a bad hash."""
    path = Path(path)
    try:  # a FIFO, /dev/zero or an oversized file is refused before anything is read
        data = read_regular(path, limit=max_model_bytes())
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
    check_graph(model, record, edge, path)
    return EdgeModel(path=path, data=data, sha256=digest, record=record, edge=edge)


def _dims(value: Any) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]


def check_graph(model: onnx.ModelProto, record: dict[str, Any], edge: dict[str, Any],
                path: Path) -> None:  # fmt: skip
    """The graph must be the one its embedded record describes: one input ``input`` of shape
    (N, in_chans, image_size, image_size), outputs ``logits`` (N, labels), ``cam``,
    ``ood_score``, and a finite OOD threshold. One EdgeError line naming the first mismatch."""
    spec = record.get("spec") or {}
    labels, size = spec.get("labels") or [], spec.get("image_size")
    chans = spec.get("in_chans", 3)
    initialisers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialisers]
    outputs = {o.name: o for o in model.graph.output}

    def refuse(what: str) -> None:
        raise EdgeError(f"{path}: the graph does not match its embedded record: {what}")

    if [i.name for i in inputs] != ["input"]:
        refuse(f"inputs {[i.name for i in inputs]}, expected ['input']")
    shape = _dims(inputs[0])
    if len(shape) != 4:
        refuse(f"input has {len(shape)} dimensions, expected 4 (N, C, H, W)")
    expected = [chans, size, size]
    for axis, (got, want) in enumerate(zip(shape[1:], expected, strict=True), start=1):
        if got is not None and got != want:
            refuse(f"input dimension {axis} is {got}, the record says {want} "
                   f"(in_chans {chans}, image_size {size})")  # fmt: skip
    missing = [name for name in OUTPUTS if name not in outputs]
    if missing:
        refuse(f"no output named {', '.join(missing)} (outputs: {sorted(outputs)})")
    logits = _dims(outputs["logits"])
    if logits and logits[-1] is not None and logits[-1] != len(labels):
        refuse(f"logits has {logits[-1]} classes, the record lists {len(labels)} labels")
    threshold = (edge.get("ood") or {}).get("threshold")
    if not isinstance(threshold, int | float) or not math.isfinite(threshold):
        refuse(f"OOD threshold {threshold!r} is not a finite number")
