"""`fedbridge server start` ends on Ctrl-C (SIGINT to its process group) and on SIGTERM while a
round runs: it says how far the run got and how to resume, stops every process it started
(SuperLink, Flower's ``flower-superexec`` and ServerApp, nginx, ``flwr run``; checked by PID)
and leaves a state the same command resumes and finishes.

Real TLS federation on loopback, two real sites (``site join``), real CXR images and the tiny
bridge bundle of the session fixture ``fed``. Every wait is bounded and fails when it runs out.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from cli import launch, ok, wait_for

from fedbridge_shared.processes import alive, descendants, free_port, process_table
from fedbridge_shared.spec import load_bundle

ROUNDS = 4


def _completed(rounds: Path) -> int:
    try:
        return int(json.loads((rounds / "state.json").read_text())["completed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _stop_mid_round(cmd: list, log: Path, rounds: Path, sig: str, started: list) -> int:
    """Start the coordinator, wait until it has saved a round of its own (so the next one is
    under way), send ``sig``; check it ends, says how to resume and leaves no process behind.
    Returns the rounds saved."""
    before = _completed(rounds)
    server = launch(*cmd, log=log)
    started.append(server)

    def saved_one() -> bool:
        assert server.poll() is None, log.read_text()[-3000:]
        return _completed(rounds) > before

    wait_for(saved_one, f"a round saved after round {before}", deadline=900)
    tree = descendants([server.pid]) - {server.pid}
    running = " ".join(process_table().get(pid, (0, ""))[1] for pid in tree)
    for child in ("flower-superlink", "flower-superexec", "nginx", "flwr run"):
        assert child in running, (child, running)
    if sig == "SIGINT":  # Ctrl-C: the terminal signals the command's foreground process group
        os.killpg(server.pid, signal.SIGINT)
    else:
        server.send_signal(signal.SIGTERM)
    rc = server.wait(timeout=120)
    text = log.read_text()
    saved = _completed(rounds)
    assert rc != 0 and saved < ROUNDS, text[-3000:]  # stopped, not finished
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: stopped on request"), text[-3000:]
    assert f"Rounds up to {saved} are saved in {rounds}" in last, last
    assert "rerun the same command to resume" in last and "Traceback" not in text, text[-3000:]
    wait_for(lambda: not any(alive(p) for p in tree), "the coordinator's children", deadline=30)
    return saved


def test_server_start_stops_on_sigint_and_sigterm_mid_round_and_resumes(fed, tmp_path, started):
    root, split = fed
    certs, keys, out = tmp_path / "certs", tmp_path / "keys", tmp_path / "fed"
    ok("server", "certs", "--out", certs)
    for name in ("site-a", "site-b"):
        ok("site", "keys", "--name", name, "--out", keys)
    port = free_port()
    cmd = [
        "server", "start", "--init", root / "bridge", "--out", out, "--certs", certs,
        "--site-key", keys / "site-a.pub", "--site-key", keys / "site-b.pub",
        "--host", "127.0.0.1", "--port", port, "--sites", "2", "--rounds", ROUNDS,
        "--augment-per-sample", "1", "--batch-size", "32", "--lr", "0.001",
    ]  # fmt: skip
    for i, name in ((1, "site-a"), (2, "site-b")):  # they keep serving across the restarts
        started.append(
            launch(
                "site",
                "join",
                "--superlink",
                f"127.0.0.1:{port}",
                "--data",
                split / f"site-{i}",
                "--name",
                name,
                "--ca",
                certs / "ca.crt",
                "--key",
                keys / f"{name}.key",
                "--runtime-port",
                free_port(),
                "--log",
                tmp_path / f"{name}.log",
                log=tmp_path / f"{name}.out",
            )  # fmt: skip
        )
    rounds = tmp_path / "fed-rounds"
    first = _stop_mid_round(cmd, tmp_path / "ctrl-c.out", rounds, "SIGINT", started)
    second = _stop_mid_round(cmd, tmp_path / "sigterm.out", rounds, "SIGTERM", started)
    assert 1 <= first < second < ROUNDS
    assert f"resuming after round {first}" in (tmp_path / "sigterm.out").read_text()
    assert not (out / "model.json").exists(), "no final bundle from a stopped run"
    assert not [p for p in rounds.rglob("*") if p.name.startswith(".")], "partial files"

    # the same command again resumes after the last saved round and finishes the run
    log = tmp_path / "resumed.out"
    server = launch(*cmd, log=log)
    started.append(server)
    assert server.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert f"resuming after round {second}" in log.read_text()
    history = load_bundle(out).training["history"]
    assert [row["round"] for row in history] == list(range(1, ROUNDS + 1)), history
    assert all(row["sites"] == ["site-a", "site-b"] for row in history), history
    assert all(p.poll() is None for p in started[:2])  # the sites served all three starts
