"""An audit trail of everything a site sends: one JSON line per reply message.

Arrays are recorded by name, shape, dtype and sha256 (not their values); metrics and config
records in full. A hospital can show exactly what left the site; the privacy test reads it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from flwr.app import Message


def describe(msg: Message) -> dict:
    """A JSON-serialisable description of a reply's full content."""
    entry: dict = {"time": time.time(), "type": msg.metadata.message_type, "records": {}}
    if msg.has_error():
        entry["error"] = msg.error.reason
        return entry
    for key, record in msg.content.items():
        if key in msg.content.array_records:
            entry["records"][key] = {
                "kind": "arrays",
                "items": {
                    name: {
                        "shape": list(arr.shape),
                        "dtype": str(arr.dtype),
                        "sha256": hashlib.sha256(arr.data).hexdigest(),
                    }
                    for name, arr in record.items()
                },
            }
        else:
            kind = "metrics" if key in msg.content.metric_records else "config"
            entry["records"][key] = {"kind": kind, "items": dict(record)}
    return entry


def record(audit_dir: str | Path, node: str, msg: Message) -> None:
    """Append the description of reply ``msg`` to ``audit_dir/node-<node>.jsonl``."""
    append_entry(audit_dir, node, describe(msg))


def audit_error(audit_dir: str | Path, node: str, msg: Message, reason: str) -> None:
    """Record that the site answered ``msg`` with an error carrying ``reason``."""
    append_entry(
        audit_dir, node, {"time": time.time(), "type": msg.metadata.message_type, "error": reason}
    )


def append_entry(audit_dir: str | Path, node: str, entry: dict) -> None:
    folder = Path(audit_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"node-{node}.jsonl").open("a") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")
