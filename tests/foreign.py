"""The foreign app of the attack on the sites: submitted with ``flwr run`` on the coordinator
host, its ClientApp (tests/foreign_app/evilapp/client.py, 15 lines) walks the site's data
folder and returns its file names and node config; its ServerApp writes what came back to
``out-file``."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import tomli_w

from fedbridge_shared.processes import tool_env

FOREIGN = Path(__file__).resolve().parent / "foreign_app"


def foreign_app(folder: Path, out_file: Path, sites: int = 2) -> Path:
    """The foreign app's folder (``folder/evil``); its ServerApp asks ``sites`` sites."""
    app = folder / "evil"
    shutil.copytree(FOREIGN, app)
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "evil", "version": "1.0.0", "dependencies": []},
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": "evil",
                    "components": {
                        "serverapp": "evilapp.server:app",
                        "clientapp": "evilapp.client:app",
                    },
                    "config": {"out-file": str(out_file), "sites": sites},
                }
            },
        },
    }
    (app / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return app


def attack(
    folder: Path, flwr_home: Path, *, sites: int, prefix: Sequence[str] = ()
) -> tuple[dict, str]:
    """``flwr run <foreign app> fedbridge --stream`` with the run's flwr home (after ``prefix``,
    e.g. ``ip netns exec NS``); returns what its ServerApp got back and ``flwr run``'s output."""
    loot = folder / "loot.json"
    env = tool_env({"FLWR_HOME": str(flwr_home)})
    done = subprocess.run(
        [*prefix, "flwr", "run", str(foreign_app(folder, loot, sites)), "fedbridge", "--stream"],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    text = done.stdout + done.stderr
    assert loot.exists(), text
    return json.loads(loot.read_text()), loot.read_text() + text


def assert_refused(got: dict, text: str, sites: int, data: Sequence[Path]) -> None:
    """Every site answered the code ``unknown_app`` and nothing else: no content, no file
    names, paths or node config in anything the attacker saw (``text``)."""
    assert got["nodes"] == sites and len(got["replies"]) == sites, got
    for reply in got["replies"]:
        assert "content" not in reply, reply
        assert '{"error": "unknown_app", "count": 1}' in reply["error"], reply
    for leak in (*map(str, data), "site-1", "data-path", ".jpg", ".png", ".dcm", "node-config"):
        assert leak not in text, leak


def audit_refusals(audit_dir: Path) -> list[dict]:
    """The audit's entries that record an unknown app's request."""
    entries = [
        json.loads(line) for f in audit_dir.glob("*.jsonl") for line in f.read_text().splitlines()
    ]
    return [e for e in entries if e.get("refused") == "unknown app asked"]
