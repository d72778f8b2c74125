"""Flower ClientApp: thin glue between Flower messages and a hospital :class:`Site`.

Only model weights, numeric metrics and the site's name leave the site. A failure crosses the
wire as a code and a count (:class:`fedbridge_shared.protocol.SiteFailure`); the full message,
with file names, stays on the site's console, log and audit.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbridge_client import secagg_app as secure
from fedbridge_client.audit import audit_error, record
from fedbridge_client.events import STARTED, append_event
from fedbridge_client.wire import WireError, recv_frame, send_frame
from fedbridge_shared import protocol as P

if TYPE_CHECKING:  # torch is imported only where a task runs in this process (simulation)
    from fedbridge_client.site import Site

log = logging.getLogger("fedbridge.site")
_sites: dict[tuple[str, str, str], Site] = {}
WORKER_TIMEOUT = 6 * 3600.0  # seconds one task may take in the site's worker


class SiteError(RuntimeError):
    """What the server is told when a site fails: ``{"error": CODE, "count": N}`` only."""


LabelMaps = Sequence[Mapping[str, Sequence[str]]]


def site_for(
    context: Context, site_paths: Sequence[str] | None, label_maps: LabelMaps | None = None
) -> Site:
    """The Site of this SuperNode: node-config ``data-path`` or, in simulation, its partition

    (folders from ``site_paths`` or the run config's ``simulation-sites``; ``label_maps``: each
    simulated site's ``--label-map``, see :class:`fedbridge_client.site.Site`).
    """
    label_map: Mapping[str, Sequence[str]] = {}
    node = context.node_config
    sim = context.run_config.get("simulation-sites")
    if not site_paths and P.NODE_DATA_PATH not in node and sim:
        site_paths = str(sim).split(",")
    if site_paths:
        pid = int(node[P.NODE_PARTITION_ID])
        data, name = site_paths[pid], f"site-{pid + 1}"
        label_map = label_maps[pid] if label_maps else {}
    elif P.NODE_DATA_PATH in node:
        data, name = str(node[P.NODE_DATA_PATH]), str(node.get(P.NODE_SITE_NAME, "site"))
    else:
        raise P.SiteFailure(
            f"this SuperNode has no node-config '{P.NODE_DATA_PATH}'",
            code=P.SiteErrorCode.DATA_FOLDER,
        )
    key = (data, name, repr(sorted((k, tuple(v)) for k, v in label_map.items())))
    if key not in _sites:
        from fedbridge_client.site import Site

        _sites[key] = Site(Path(data), name, label_map)
    return _sites[key]


def _guarded(
    handler: Callable[[Site, Message], RecordDict], site_paths, audit_dir, label_maps=None
):
    def run(msg: Message, context: Context) -> Message:
        node = context.node_config
        audit = audit_dir or node.get(P.NODE_AUDIT_DIR)
        who = str(node.get(P.NODE_PARTITION_ID, context.node_id))
        events = node.get(P.NODE_EVENTS_FILE)
        kind = {"train": "training", "evaluate": "evaluation"}.get(
            msg.metadata.message_type.split(".")[0], "secure aggregation"
        )
        round_, rounds, labels = _round_of(msg), _rounds_of(msg), _labels_of(msg)
        if events and msg.metadata.message_type in ("train", "evaluate", secure.TRAIN):
            append_event(events, round_=round_, kind=kind, ok=True, detail=STARTED, rounds=rounds)
        try:
            worker = node.get(P.NODE_WORKER_SOCKET)
            if msg.metadata.message_type in secure.STAGES:
                content = secure.STAGES[msg.metadata.message_type](msg, context)
            elif worker and not site_paths:
                content = _in_worker(str(worker), msg)
            else:
                content = handler(site_for(context, site_paths, label_maps), msg)
            if msg.metadata.message_type == secure.TRAIN:
                content = secure.mask_reply(content, msg, context)
            reply = Message(content=content, reply_to=msg)
        except Exception as e:
            failure = P.as_failure(e)
            log.error("site failed: %s", failure)  # the local log keeps the full message
            if events:
                detail = f"{failure} [sent: {failure.code.value} {failure.count}]"
                append_event(events, round_=round_, kind=kind, ok=False, detail=detail)
            if audit:
                audit_error(audit, who, msg, failure.wire())
            raise SiteError(failure.wire()) from None
        if audit:
            record(audit, who, reply)
        if events:
            append_event(
                events, round_=round_, kind=kind, ok=True, detail=_summary(reply), rounds=rounds,
                metrics=_numbers(reply), labels=labels,
            )  # fmt: skip
        return reply

    return run


def _round_of(msg: Message) -> int | None:
    try:
        return int(msg.content[P.CONFIG][P.SERVER_ROUND])
    except (KeyError, TypeError, ValueError):
        return None


def _rounds_of(msg: Message) -> int | None:
    try:
        return int(msg.content[P.CONFIG][P.NUM_ROUNDS])
    except (KeyError, TypeError, ValueError):
        return None


def _labels_of(msg: Message) -> list[str] | None:
    """The task's label names (for the site console's per-class counts)."""
    try:
        return [str(x) for x in P.RoundTask.from_config(dict(msg.content[P.CONFIG])).spec["labels"]]
    except Exception:  # a malformed task is refused by the handler with its own reason
        return None


def _numbers(reply: Message) -> dict[str, int | float]:
    metrics = reply.content.metric_records.get(P.METRICS)
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float)}


def _summary(reply: Message) -> str:
    metrics = reply.content.metric_records.get(P.METRICS)
    if metrics is None:
        return "done"
    shown = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
    )


def _in_worker(path: str, msg: Message) -> RecordDict:
    """Run the task in the site's long-lived worker (see :mod:`fedbridge_client.worker`)."""
    kind = msg.metadata.message_type.split(".")[0]  # train.secagg trains like train
    header = {"kind": kind, "config": dict(msg.content[P.CONFIG])}
    arrays = {P.WEIGHTS: _weights(msg)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WORKER_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as e:
            raise P.SiteFailure(
                f"the site's worker is not running ({e.strerror}); restart `fedbridge site join`",
                code=P.SiteErrorCode.WORKER_DOWN,
            ) from None
        try:
            send_frame(sock, header, arrays)
            answer, weights = recv_frame(sock)
        except (OSError, WireError) as e:
            raise P.SiteFailure(
                f"the site's worker stopped during the task: {e}", code=P.SiteErrorCode.WORKER_DOWN
            ) from None
    if not answer.get("ok"):
        try:
            code = P.SiteErrorCode(answer.get("error"))
        except ValueError:
            code = P.SiteErrorCode.INTERNAL
        raise P.SiteFailure(
            f"the site's worker refused the task: {code.value} (its log says why)",
            code=code,
            count=int(answer.get("count", 1)),
        )
    content = {
        P.METRICS: MetricRecord(answer["metrics"]),
        P.SITE: ConfigRecord({P.SITE_NAME: str(answer["site"])}),
    }
    if kind == "train":
        content[P.ARRAYS] = ArrayRecord({P.WEIGHTS: Array(weights[P.WEIGHTS])})
    return RecordDict(content)


def _weights(msg: Message) -> np.ndarray:
    """The packed weights of a task (see :func:`fedbridge_shared.weights.pack`)."""
    record = msg.content[P.ARRAYS]
    if list(record.keys()) != [P.WEIGHTS]:
        raise P.SiteFailure(
            f"the server sent arrays {list(record)[:3]}, not one packed {P.WEIGHTS!r}",
            code=P.SiteErrorCode.BAD_TASK,
        )
    return record[P.WEIGHTS].numpy()


def _task(msg: Message) -> tuple[P.RoundTask, np.ndarray]:
    return P.RoundTask.from_config(dict(msg.content[P.CONFIG])), _weights(msg)


def _site_record(site: Site) -> ConfigRecord:
    return ConfigRecord({P.SITE_NAME: site.name})


def _train(site: Site, msg: Message) -> RecordDict:
    from fedbridge_shared.weights import pack

    new_state, reply = site.train(*_task(msg))
    return RecordDict(
        {
            P.ARRAYS: ArrayRecord({P.WEIGHTS: Array(pack(new_state))}),
            P.METRICS: MetricRecord(reply.to_metrics()),
            P.SITE: _site_record(site),
        }
    )


def _evaluate(site: Site, msg: Message) -> RecordDict:
    reply = site.evaluate(*_task(msg))
    return RecordDict({P.METRICS: MetricRecord(reply.to_metrics()), P.SITE: _site_record(site)})


def make_client_app(
    site_paths: Sequence[str] | None = None,
    mods: Sequence = (),
    audit_dir: str | None = None,
    label_maps: LabelMaps | None = None,
) -> ClientApp:
    """A ClientApp; ``site_paths`` maps simulation partitions to local folders (and
    ``label_maps`` to each one's label map).

    With ``audit_dir`` (or node-config ``audit-dir``) every reply is described in a JSON-lines
    audit file (see :mod:`fedbridge_client.audit`).
    """
    app = ClientApp(mods=list(mods))
    train, evaluate = (_guarded(h, site_paths, audit_dir, label_maps) for h in (_train, _evaluate))
    app.train()(train)
    app.evaluate()(evaluate)
    app.train("secagg")(train)
    for kind in secure.QUERIES:
        app.query(kind)(evaluate)  # routed to secure.STAGES
    return app


app = make_client_app()
