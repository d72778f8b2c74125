"""Flower ClientApp: thin glue between Flower messages and a hospital :class:`Site`.

Only model weights, numeric metrics and the site's name leave the site. Errors are reported
to the server without file names or paths (the full message is logged locally).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbridge_client.audit import audit_error, record
from fedbridge_client.site import LocalSettings, Site, as_float_metrics
from fedbridge_shared.spec import ModelSpec

log = logging.getLogger("fedbridge.site")
_sites: dict[tuple[str, str], Site] = {}


class SiteError(RuntimeError):
    """What the server is told when a site fails: the reason with paths removed."""


def site_for(context: Context, site_paths: Sequence[str] | None) -> Site:
    """The Site of this SuperNode: node-config ``data-path`` or, in simulation, its partition

    (folders from ``site_paths`` or the run config's ``simulation-sites``).
    """
    node = context.node_config
    if not site_paths and "data-path" not in node and context.run_config.get("simulation-sites"):
        site_paths = str(context.run_config["simulation-sites"]).split(",")
    if site_paths:
        pid = int(node["partition-id"])
        data, name = site_paths[pid], f"site-{pid + 1}"
    elif "data-path" in node:
        data, name = str(node["data-path"]), str(node.get("site-name", "site"))
    else:
        raise SiteError("this SuperNode has no node-config 'data-path'")
    key = (data, name)
    if key not in _sites:
        _sites[key] = Site(Path(data), name)
    return _sites[key]


def _redact(text: str, paths: Sequence[str]) -> str:
    for p in sorted({*paths, *(str(Path(x).resolve()) for x in paths)}, key=len, reverse=True):
        text = text.replace(p, "<site data>")
    return text


def _guarded(handler: Callable[[Site, Message], RecordDict], site_paths, audit_dir):
    def run(msg: Message, context: Context) -> Message:
        node = context.node_config
        paths = list(site_paths or [str(node.get("data-path", ""))])
        audit = audit_dir or node.get("audit-dir")
        who = str(node.get("partition-id", context.node_id))
        try:
            site = site_for(context, site_paths)
            reply = Message(content=handler(site, msg), reply_to=msg)
        except Exception as e:
            log.error("site failed: %s", e)  # local log keeps the full message
            error = SiteError(_redact(f"{type(e).__name__}: {e}", [p for p in paths if p]))
            if audit:
                audit_error(audit, who, msg, str(error))
            raise error from None
        if audit:
            record(audit, who, reply)
        return reply

    return run


def _inputs(msg: Message):
    config = msg.content["config"]
    spec = ModelSpec.from_dict(json.loads(str(config["spec-json"])))
    settings = LocalSettings.from_config(dict(config))
    return spec, msg.content["arrays"].to_torch_state_dict(), settings, int(config["server-round"])


def _train(site: Site, msg: Message) -> RecordDict:
    spec, state, settings, server_round = _inputs(msg)
    new_state, metrics = site.train(spec, state, settings, server_round)
    return RecordDict(
        {
            "arrays": ArrayRecord(new_state),
            "metrics": MetricRecord(as_float_metrics(metrics)),
            "site": ConfigRecord({"name": site.name}),
        }
    )


def _evaluate(site: Site, msg: Message) -> RecordDict:
    spec, state, settings, _ = _inputs(msg)
    metrics = site.evaluate(spec, state, settings)
    return RecordDict(
        {
            "metrics": MetricRecord(as_float_metrics(metrics)),
            "site": ConfigRecord({"name": site.name}),
        }
    )


def make_client_app(
    site_paths: Sequence[str] | None = None, mods: Sequence = (), audit_dir: str | None = None
) -> ClientApp:
    """A ClientApp; ``site_paths`` maps simulation partitions to local folders.

    With ``audit_dir`` (or node-config ``audit-dir``) every reply is described in a JSON-lines
    audit file (see :mod:`fedbridge_client.audit`).
    """
    app = ClientApp(mods=list(mods))
    app.train()(_guarded(_train, site_paths, audit_dir))
    app.evaluate()(_guarded(_evaluate, site_paths, audit_dir))
    return app


app = make_client_app()
