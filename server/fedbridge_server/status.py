"""``fedbridge server status``: the federation as the coordinator sees it, during and after a run.

Two sources: the SuperLink, through Flower's own CLI (``flwr supernode list`` and ``flwr ls``,
``--format json``, with the coordinator's ``flwr-home``), and the round store beside the output
bundle (``OUT-rounds/state.json``, written after each completed round, and ``live.json``, the
round in progress, written by the round loop). Either may be absent: the SuperLink stops when
``server start`` ends, and no round has completed before the first one does.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedbridge_shared import rounds as R
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.files import atomic_write, read_json_object, strict_json
from fedbridge_shared.layout import SPEC_FILE, beside

LIVE_FILE = "live.json"
STATE_FILE = "state.json"


def write_live(folder: Path, **fields: Any) -> None:
    """Record the round in progress (round, rounds, phase, sites waited for, …), atomically."""
    doc = {**fields, "updated_at": now()}
    text = strict_json(doc, where=str(folder / LIVE_FILE), indent=2, default=str) + "\n"
    atomic_write(folder / LIVE_FILE, text.encode())


def now() -> str:
    """UTC now as the status files write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path, what="status JSON")


def _superlink(state: Path) -> dict[str, Any]:
    """Sites and runs from the SuperLink's Control API, or why they could not be had."""
    from fedbridge_server.deploy import CONNECTION, _flwr, _last
    from fedbridge_shared.processes import tool_env

    home = state / "flwr-home"
    out: dict[str, Any] = {"reachable": False, "error": None, "nodes": [], "runs": []}
    if not (home / "config.toml").is_file():
        out["error"] = f"no Flower CLI config in {home} (the coordinator never started here)"
        return out
    env = tool_env({"FLWR_HOME": str(home)})
    for key, args in (("nodes", ["supernode", "list"]), ("runs", ["ls"])):
        try:
            rc, text = _flwr([*args, CONNECTION, "--format", "json"], env, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            out["error"] = f"`flwr {' '.join(args)}` failed: {e}"
            return out
        doc = _json_in(text)
        if doc is None or not doc.get("success"):
            why = (doc or {}).get("error-message") or text
            out["error"] = _last(str(why))
            return out
        out[key] = doc.get(key, [])
    out["reachable"] = True
    return out


def _json_in(text: str) -> dict[str, Any] | None:
    """The JSON object in Flower's output (it prints its banner lines elsewhere)."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        doc, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def collect(out: Path, state: Path | None = None) -> dict[str, Any]:
    """The status document (what ``--json`` prints) for the run whose final bundle is ``out``."""
    out = Path(out)
    state = Path(state) if state else beside(out, "superlink")
    store = beside(out, "rounds")
    if not state.is_dir() and not store.is_dir():
        raise ConfigError(
            f"no coordinator here: neither {state} nor {store} exists "
            "(give the --out (and --state) that `fedbridge server start` was given)"
        )
    saved = _read_json(store / STATE_FILE) or {}
    live = _read_json(store / LIVE_FILE)
    link = _superlink(state) if state.is_dir() else {
        "reachable": False, "error": f"no state folder {state}", "nodes": [], "runs": []
    }  # fmt: skip
    history: list[dict[str, Any]] = list(saved.get("history") or [])
    completed = int(saved.get("completed") or 0)
    total = (saved.get("fingerprint") or {}).get("num-server-rounds")
    if live and live.get("rounds"):
        total = live["rounds"]
    names = {str(k): v for k, v in ((live or {}).get("nodes") or {}).items()}
    current = live if live and int(live.get("round") or 0) > completed else None
    finished = (out / SPEC_FILE).is_file() and total is not None and completed >= int(total)
    running = link["reachable"] and any(r.get("status") == "running" for r in link["runs"])
    return {
        "out": str(out),
        "state": str(state),
        "superlink": {"reachable": link["reachable"], "error": link["error"]},
        "sites": [_site(n, names) for n in link["nodes"]],
        "runs": [_run(r) for r in link["runs"]],
        "rounds": {
            "total": total,
            "run_id": (live or {}).get("run_id"),
            "completed": completed,
            "current": current,
            "finished": finished,
            "running": running,
            "best_round": saved.get("best_round") or None,
            "best_score": saved.get("best_score"),
            "best_rule": saved.get("best_rule") or None,
        },
        "history": history,
        "dropped": [
            {"round": h[R.ROUND], "why": why} for h in history for why in h.get(R.DROPPED) or []
        ],
        "bundle": str(out) if (out / SPEC_FILE).is_file() else None,
        "privacy": privacy_spent(history),
    }


def privacy_spent(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """ε spent so far: per site under record-level DP-SGD (each site's largest reported ε), the
    run's under site-level DP; None without DP."""
    rows = [h[R.PRIVACY] for h in history if h.get(R.PRIVACY)]
    if not rows:
        return None
    if rows[-1].get("level") == "record":
        per_site: dict[str, float] = {}
        for r in rows:
            for name, eps in (r.get("epsilon_per_site") or {}).items():
                per_site[name] = max(per_site.get(name, 0.0), float(eps))
        return {"level": "record", "delta": rows[-1].get("delta"),
                "epsilon_per_site": dict(sorted(per_site.items()))}  # fmt: skip
    return {"level": "site", "delta": rows[-1].get("delta"), "epsilon": rows[-1].get("epsilon")}


def _site(node: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    node_id = str(node.get("node-id"))
    return {
        "node_id": node_id,
        "name": names.get(node_id),
        "status": node.get("status"),
        "registered_at": node.get("created-at"),
        "online_at": node.get("online-at"),
        "offline_at": node.get("offline-at"),
    }


def _run(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": str(run.get("run-id")),
        "app": f"{run.get('fab-name')}=={run.get('fab-version')}",
        "status": run.get("status"),
        "details": run.get("status-details") or None,
        "elapsed": run.get("elapsed"),
        "running_at": run.get("running-at") or None,
        "finished_at": run.get("finished-at") or None,
    }


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def shown(text: object) -> str:
    """Text from outside (site names, Flower's messages) with rich markup escaped."""
    return escape(str(text))


def render(doc: dict[str, Any], console: Console) -> None:
    """The status as tables for people."""
    link = doc["superlink"]
    if link["reachable"]:
        console.print(f"SuperLink: [green]running[/] (state {shown(doc['state'])})")
    else:
        console.print(f"SuperLink: [yellow]not reachable[/] — {shown(link['error'])}")
    if doc["sites"]:
        t = Table(title="sites (SuperNodes)")
        for col in ("node", "site", "status", "online since", "offline since"):
            t.add_column(col)
        for s in doc["sites"]:
            colour = {"online": "green", "offline": "yellow"}.get(str(s["status"]), "blue")
            t.add_row(
                s["node_id"], shown(s["name"] or "?"), f"[{colour}]{shown(s['status'])}[/]",
                shown(s["online_at"] or ""), shown(s["offline_at"] or ""),
            )  # fmt: skip
        console.print(t)
    if doc["runs"]:
        t = Table(title="runs")
        for col in ("run", "app", "status", "elapsed", "finished"):
            t.add_column(col)
        for r in doc["runs"]:
            status = r["status"] + (f" ({r['details']})" if r["details"] else "")
            t.add_row(
                r["run_id"], shown(r["app"]), shown(status), shown(r["elapsed"] or ""),
                shown(r["finished_at"] or ""),
            )  # fmt: skip
        console.print(t)
    rounds = doc["rounds"]
    line = f"rounds: {rounds['completed']} of {rounds['total'] or '?'} completed"
    if rounds["current"] and rounds["running"]:
        c = rounds["current"]
        line += (
            f"; round {c['round']} {shown(c.get('phase'))} since {shown(c.get('started_at'))} "
            f"(waiting for {c.get('waiting_for')} site(s))"
        )
    elif rounds["current"]:
        c = rounds["current"]
        line += (
            f"; round {c['round']} was in {shown(c.get('phase'))} when its run stopped "
            "(`server start` again resumes after the last completed round)"
        )
    elif rounds["finished"]:
        line += f"; finished → {shown(doc['bundle'])}"
    if rounds["best_round"]:
        line += f"; best round {rounds['best_round']} (score {_f(rounds['best_score'], 4)}"
        line += f", {rounds['best_rule']})" if rounds.get("best_rule") else ")"
    console.print(line)
    spent = doc.get("privacy")
    if spent and spent["level"] == "record":
        sites = ", ".join(f"{shown(n)} ε {e:.2f}" for n, e in spent["epsilon_per_site"].items())
        console.print(f"privacy spent (DP-SGD per patient, δ {spent['delta']:g}): {sites}")
    elif spent:
        eps, delta = spent["epsilon"], spent["delta"]
        console.print(f"privacy spent (site-level): ε {eps:.2f} at δ {delta:g}")
    if doc["history"]:
        _history_tables(doc["history"], console)
    for d in doc["dropped"]:
        console.print(f"[yellow]round {d['round']} dropped[/] {shown(d['why'])}")


def _history_tables(history: list[dict[str, Any]], console: Console) -> None:
    t = Table(title="rounds")
    cols = ("round", "sites", "train loss", "train acc", "fed val loss", "fed val acc")
    server = any(h.get(R.SERVER_VAL_LOSS) is not None for h in history)
    for col in (*cols, *(("server val loss", "server val acc") if server else ()), "seconds"):
        t.add_column(col, justify="right")
    for h in history:
        t.add_row(
            str(h[R.ROUND]), str(len(h.get(R.SITES) or [])), _f(h.get(R.TRAIN_LOSS)),
            _f(h.get(R.TRAIN_ACCURACY)), _f(h.get(R.FEDERATED_VAL_LOSS)),
            _f(h.get(R.FEDERATED_VAL_ACCURACY)),
            *((_f(h.get(R.SERVER_VAL_LOSS)), _f(h.get(R.SERVER_VAL_ACCURACY))) if server else ()),
            _f(h.get(R.SECONDS), 1),
        )  # fmt: skip
    console.print(t)
    t = Table(title="per site")
    for col in ("round", "site", "train n", "train loss", "train acc", "val n", "val loss"):
        t.add_column(col, justify="right")
    t.add_column("val acc", justify="right")
    private = any("epsilon" in s for h in history for s in (h.get(R.PER_SITE) or {}).values())
    if private:
        t.add_column("ε", justify="right")
    for h in history:
        for name, s in (h.get(R.PER_SITE) or {}).items():
            t.add_row(
                str(h[R.ROUND]), shown(name), str(s.get("train_examples", "—")),
                _f(s.get("train_loss")), _f(s.get("train_accuracy")),
                str(s.get("val_examples", "—")), _f(s.get("val_loss")), _f(s.get("val_accuracy")),
                *((_f(s.get("epsilon"), 2),) if private else ()),
            )  # fmt: skip
    console.print(t)
