"""The only code a deployed site runs for a run: fedbridge's installed ClientApp.

Flower's SuperNode starts ``flwr-clientapp`` for every message, which installs the run's app
(FAB) and runs *its* code with the site's rights. Flower's own check (``--trusted-entities``)
only passes FABs signed by Flower's hosted hub, so it would refuse a self-hosted fedbridge run
too. ``site join`` therefore puts this module first on the SuperNode's PATH as
``flwr-clientapp``: it takes the task from the SuperNode as Flower's does, then

* accepts only fedbridge's own app: a FAB holding nothing but a ``pyproject.toml`` whose
  publisher and components are fedbridge's (the code is the installed fedbridge);
* never installs or imports anything from the FAB: it runs the installed
  :data:`fedbridge_client.client_app.app`, which hands the task to the site's worker;
* refuses any other app before it runs: the site's console (events file) and audit record
  "unknown app asked", and the coordinator gets the code ``unknown_app``.
"""

from __future__ import annotations

import io
import time
import zipfile
from typing import Any

import tomllib

from fedbridge_client.audit import append_entry
from fedbridge_client.events import append_event
from fedbridge_shared import protocol as P

PUBLISHER = "fedbridge"
COMPONENTS = {
    "serverapp": "fedbridge_server.server_app:app",
    "clientapp": "fedbridge_client.client_app:app",
}
FAB_FILES = {"pyproject.toml", ".info/CONTENT"}


def app_problem(fab_content: bytes) -> str | None:
    """Why a FAB is not fedbridge's own app (None when it is)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
            names = set(fab.namelist())
            if not names <= FAB_FILES or "pyproject.toml" not in names:
                other = sorted(names - FAB_FILES)[:3]
                return f"it ships files of its own ({', '.join(other) or 'no pyproject.toml'})"
            doc = tomllib.loads(fab.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        return f"it is not a readable app ({e})"
    app = doc.get("tool", {}).get("flwr", {}).get("app", {})
    if app.get("publisher") != PUBLISHER:
        return f"its publisher is {str(app.get('publisher'))[:40]!r}, not {PUBLISHER!r}"
    if app.get("components") != COMPONENTS:
        return f"its components are {app.get('components')!r}, not fedbridge's"
    return None


class UnknownApp(RuntimeError):
    """Raised inside Flower's ClientApp runner: its text is all the coordinator is told."""


def _refuse(context: Any, message: Any, run: Any, why: str) -> None:
    node = context.node_config
    detail = f"unknown app asked (run {run.run_id}, {run.fab_id} {run.fab_version}): {why}"
    if node.get(P.NODE_EVENTS_FILE):
        append_event(
            str(node[P.NODE_EVENTS_FILE]), round_=None, kind="app check", ok=False, detail=detail
        )
    if node.get(P.NODE_AUDIT_DIR):
        who = str(node.get(P.NODE_SITE_NAME, context.node_id))
        entry = {
            "time": time.time(), "type": message.metadata.message_type,
            "refused": "unknown app asked", "run": run.run_id, "fab_id": run.fab_id,
            "fab_hash": run.fab_hash, "why": why,
        }  # fmt: skip
        append_entry(str(node[P.NODE_AUDIT_DIR]), who, entry)
    failure = P.SiteFailure(detail, code=P.SiteErrorCode.UNKNOWN_APP)
    raise UnknownApp(failure.wire())


def main() -> None:
    """``flwr-clientapp`` with the app check, and fedbridge's installed ClientApp."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runner

    pull = runner.pull_task_input
    task: dict[str, Any] = {}

    def pull_and_remember(client):
        message, context, run, fab = pull(client)
        task.update(message=message, context=context, run=run)
        return message, context, run, fab

    def check_instead_of_install(fab_content: bytes, *args, **kwargs) -> None:
        why = app_problem(fab_content)
        if why is not None:
            _refuse(task["context"], task["message"], task["run"], why)

    def installed_app(*args, **kwargs):
        from fedbridge_client.client_app import app

        return lambda *_: app

    runner.pull_task_input = pull_and_remember
    runner.install_from_fab = check_instead_of_install
    runner.get_load_client_app_fn = installed_app
    flwr_clientapp()


if __name__ == "__main__":
    main()
