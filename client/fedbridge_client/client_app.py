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

from fedbridge_client.site import LocalSettings, Site, as_float_metrics
from fedbridge_shared.spec import ModelSpec

log = logging.getLogger("fedbridge.site")
_sites: dict[tuple[str, str], Site] = {}


class SiteError(RuntimeError):
    """What the server is told when a site fails: the reason with paths removed."""


def site_for(context: Context, site_paths: Sequence[str] | None) -> Site:
    """The Site of this SuperNode: node-config ``data-path`` or, in simulation, its partition."""
    node = context.node_config
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


def _guarded(handler: Callable[[Site, Message], RecordDict], site_paths):
    def run(msg: Message, context: Context) -> Message:
        paths = list(site_paths or [str(context.node_config.get("data-path", ""))])
        try:
            site = site_for(context, site_paths)
            content = handler(site, msg)
        except Exception as e:
            log.error("site failed: %s", e)  # local log keeps the full message
            raise SiteError(_redact(f"{type(e).__name__}: {e}", [p for p in paths if p])) from None
        return Message(content=content, reply_to=msg)

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


def make_client_app(site_paths: Sequence[str] | None = None, mods=()) -> ClientApp:
    """A ClientApp; ``site_paths`` maps simulation partitions to local folders."""
    app = ClientApp(mods=list(mods))
    app.train()(_guarded(_train, site_paths))
    app.evaluate()(_guarded(_evaluate, site_paths))
    return app


app = make_client_app()
