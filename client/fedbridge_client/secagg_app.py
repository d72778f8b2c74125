"""Flower glue of a site's secure aggregation (thin): messages ↔ :mod:`fedbridge_client.secagg`.

The site's secrets between the four messages of a round live in the node's ``Context.state``
(kept by the SuperNode, never sent), as JSON with base64 bytes — never a pickle.
"""

from __future__ import annotations

import base64
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedbridge_client import secagg as C
from fedbridge_shared import protocol as P

SECAGG = "secagg"
TRAIN = "train.secagg"
QUERIES = ("secagg_setup", "secagg_share", "secagg_unmask")
_STATE = "fedbridge-secagg"


def _ids(text) -> list[int]:
    return [int(v) for v in str(text).split(",") if v]


def _b(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _load(context: Context) -> dict:
    record = context.state.config_records.get(_STATE)
    if record is None:
        return {}
    raw = json.loads(bytes(record["json"]).decode())
    unb = base64.b64decode
    out: dict = {k: unb(v) for k, v in raw.items() if k in ("enc-key", "mask-key", "seed")}
    if "publics" in raw:
        out["publics"] = {int(j): (unb(a), unb(b)) for j, (a, b) in raw["publics"].items()}
        out["inbox"] = {int(j): unb(v) for j, v in raw["inbox"].items()}
        out["threshold"] = int(raw["threshold"])
    out["masked"] = bool(raw.get("masked"))
    return out


def _save(context: Context, state: dict) -> None:
    raw: dict = {k: _b(state[k]) for k in ("enc-key", "mask-key", "seed") if k in state}
    if "publics" in state:
        raw["publics"] = {str(j): [_b(a), _b(b)] for j, (a, b) in state["publics"].items()}
        raw["inbox"] = {str(j): _b(v) for j, v in state["inbox"].items()}
        raw["threshold"] = state["threshold"]
    raw["masked"] = bool(state.get("masked"))
    context.state[_STATE] = ConfigRecord({"json": json.dumps(raw).encode()})


def _setup(msg: Message, context: Context) -> RecordDict:
    state: dict = {}
    publics = C.setup(state)
    _save(context, state)
    return RecordDict({SECAGG: ConfigRecord(publics)})


def _share(msg: Message, context: Context) -> RecordDict:
    record = msg.content[SECAGG]
    state = _load(context)
    publics = {j: (record[f"enc-{j}"], record[f"mask-{j}"]) for j in _ids(record["participants"])}
    out = C.share(state, own=context.node_id, publics=publics, threshold=int(record["threshold"]))
    _save(context, state)
    return RecordDict({SECAGG: ConfigRecord({f"to-{j}": c for j, c in out.items()})})


def _unmask(msg: Message, context: Context) -> RecordDict:
    record = msg.content[SECAGG]
    state = _load(context)
    out = C.unmask(state, survivors=_ids(record["survivors"]), dropped=_ids(record["dropped"]))
    _save(context, state)
    return RecordDict({SECAGG: ConfigRecord(out)})


STAGES = {f"query.{q}": f for q, f in zip(QUERIES, (_setup, _share, _unmask), strict=True)}


def mask_reply(content: RecordDict, msg: Message, context: Context) -> RecordDict:
    """The training reply with its weights replaced by the masked, sample-weighted update."""
    record = msg.content[SECAGG]
    state = _load(context)
    new = content[P.ARRAYS][P.WEIGHTS].numpy().astype(np.float64)
    old = msg.content[P.ARRAYS][P.WEIGHTS].numpy().astype(np.float64)
    inbox = {int(k[5:]): v for k, v in record.items() if k.startswith("from-")}
    metrics = content[P.METRICS]
    masked, clipped = C.mask(
        state, own=context.node_id, participants=_ids(record["participants"]), inbox=inbox,
        delta=new - old, weight=int(metrics[P.NUM_EXAMPLES]), clip=float(record["clip"]),
    )  # fmt: skip
    _save(context, state)
    metrics["secagg-clipped"] = clipped
    content[P.ARRAYS] = ArrayRecord({P.WEIGHTS: Array(masked)})
    return content
