"""Faults on Flower's Deployment Engine, with TLS and SuperNode authentication, the coordinator
and each site in a network namespace of their own (loopback where the machine cannot make them).

(a) A SuperNode (and its ``flower-superexec`` children) is SIGKILLed while round 2 trains:
    the run completes with the other sites and the round's history names the dropped site.
(b) The whole ``fedbridge server start`` tree is SIGKILLed after round 1 is checkpointed and
    the same command is started again: it resumes after round 1 and ends with weights bitwise
    equal to an uninterrupted run with the same seed.

Every process started here is stopped by PID (see ``started``), children included.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli import launch, ok
from rich.console import Console

from fedbridge_shared.processes import alive, descendants, free_port, stop_pids
from fedbridge_shared.spec import load_bundle

TIMINGS: dict[str, float] = {}


def _wait(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"{what}: process ended\n{log.read_text(errors='replace')}"
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout} s\n{log.read_text(errors='replace')}")


def _kill_tree(pids) -> set[int]:
    """SIGKILL these processes and every descendant (Flower's --parent-pid children too)."""
    tree = descendants(pids)
    groups = set()
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # a killed nginx worker is respawned by its master if that still lived: end whole groups
    for group in groups - {os.getpgid(0)}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.1)
    return tree


def _completed(rounds_dir: Path) -> int:
    try:
        return json.loads((rounds_dir / "state.json").read_text())["completed"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    root = tmp_path_factory.mktemp("creds")
    from netns import SUBNET

    # valid for the coordinator's namespace address too (tests/netns.py assigns .1)
    ok("server", "certs", "--out", root / "certs", "--host", f"{SUBNET}.1")
    for name in ("site-1", "site-2", "site-3"):
        ok("site", "keys", "--name", name, "--out", root / "keys")
    return root


def _server_args(fed, creds, out: Path, port: int, names, *extra, host: str = "127.0.0.1"):
    root, _ = fed
    args = [
        "server", "start",
        "--init", root / "bridge",
        "--out", out,
        "--certs", creds / "certs",
        "--host", host, "--port", port,
        "--rounds", "2", "--seed", "7",
        "--augment-per-sample", "1", "--batch-size", "32", "--lr", "0.001",
    ]  # fmt: skip
    for name in names:
        args += ["--site-key", creds / "keys" / f"{name}.pub"]
    return [*args, *extra]


def _join(fed, creds, tmp_path: Path, port: int, name: str, net) -> subprocess.Popen:
    _, split = fed
    return launch(
        "site", "join",
        "--superlink", f"{net.address('coord')}:{port}",
        "--data", split / name,
        "--name", name,
        "--ca", creds / "certs" / "ca.crt",
        "--key", creds / "keys" / f"{name}.key",
        "--runtime-port", free_port(),
        "--log", tmp_path / f"{name}.log",
        log=tmp_path / f"{name}.out", prefix=net.prefix(name),
    )  # fmt: skip


def test_a_site_killed_mid_round_is_dropped_and_the_run_completes(
    fed, creds, net, tmp_path, started
):
    names = ("site-1", "site-2", "site-3")
    port = free_port()
    log = tmp_path / "server.out"
    out = tmp_path / "fed"
    t0 = time.monotonic()
    server = launch(
        *_server_args(
            fed, creds, out, port, names,
            "--sites", "3", "--min-sites", "2",  # a run must go on with 2 of the 3 sites
            "--set", "round-timeout=300", "--set", "site-wait-timeout=20",
            host=net.address("coord"),
        ),
        log=log, prefix=net.prefix("coord"),
    )  # fmt: skip
    started.append(server)
    sites = {name: _join(fed, creds, tmp_path, port, name, net) for name in names}
    started.extend(sites.values())
    # round 1 checkpointed: round 2's training has just been sent to all three sites
    rounds_dir = tmp_path / "fed-rounds"
    _wait(lambda: _completed(rounds_dir) >= 1, server, log, 300, "round 1")
    first = json.loads((rounds_dir / "state.json").read_text())["history"][0]["sites"]
    assert first == list(names)  # round 1 waited for every expected site
    gone = first[-1]
    killed = _kill_tree([sites[gone].pid])
    assert len(killed) >= 2  # the SuperNode and its flower-superexec child(ren)
    assert server.wait(timeout=300) == 0, log.read_text()
    TIMINGS["kill-site"] = time.monotonic() - t0

    history = load_bundle(out).training["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert history[0]["sites"] == first and history[0]["dropped"] == []
    assert history[1]["sites"] == [n for n in first if n != gone]
    dropped = [d for d in history[1]["dropped"] if not d.endswith("(evaluation)")]
    assert dropped and all(d.startswith(f"{gone}: ") for d in dropped), history[1]
    text = log.read_text()
    assert f"dropped: {gone}" in text
    weights = load_bundle(out).state_dict
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    print(json.dumps({"history": history, "seconds": TIMINGS["kill-site"]}, default=str))


def test_server_killed_after_round_1_resumes_and_matches_an_uninterrupted_run(
    fed, creds, net, tmp_path, started
):
    from fedbridge.cli.federate import run_config
    from fedbridge.simulate import simulate

    root, split = fed
    names = ("site-1", "site-2")
    port = free_port()
    log = tmp_path / "server.out"
    out = tmp_path / "fed"
    # one torch thread per site, as in the simulation reference: float sums depend on it
    args = _server_args(
        fed, creds, out, port, names, "--sites", "2", "--set", "threads=1",
        host=net.address("coord"),
    )  # fmt: skip
    t0 = time.monotonic()
    server = launch(*args, log=log, prefix=net.prefix("coord"))
    started.append(server)
    started.extend(_join(fed, creds, tmp_path, port, name, net) for name in names)
    rounds_dir = tmp_path / "fed-rounds"
    _wait(lambda: _completed(rounds_dir) >= 1, server, log, 300, "round 1")
    _kill_tree([server.pid])
    assert _completed(rounds_dir) == 1 and not out.exists()  # killed before round 2 ended

    again = launch(*args, log=log, prefix=net.prefix("coord"))
    started.append(again)
    assert again.wait(timeout=400) == 0, log.read_text()
    TIMINGS["kill-server"] = time.monotonic() - t0
    text = log.read_text()
    assert "resuming after round 1" in text
    history = load_bundle(out).training["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["sites"] == list(names) and h["dropped"] == [] for h in history)

    # the uninterrupted reference: same settings and seed, sites named alike, in simulation
    flat = run_config(
        init=root / "bridge", out=tmp_path / "whole", sites=2, rounds=2, strategy="fedavg",
        augment_per_sample=1, augment="cxr", local_epochs=1, lr=0.001, batch_size=32,
        val=None, test=None, seed=7, settings=["threads=1"],
    )  # fmt: skip
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    simulate(flat, [split / n for n in names], out=quiet)
    for name in ("round-0001", "round-0002"):
        a = load_bundle(tmp_path / "whole-rounds" / name).state_dict
        b = load_bundle(rounds_dir / name).state_dict
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"
    a, b = load_bundle(tmp_path / "whole").state_dict, load_bundle(out).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    print(json.dumps({"history": history, "seconds": TIMINGS["kill-server"]}, default=str))


def test_a_killed_coordinator_leaves_no_orphans_and_a_second_one_is_refused(fed, tmp_path, started):
    """SIGKILL of `server start` alone (the PID an admin sees): its SuperLink dies with it;
    while one runs, a second `server start` for the same --out is refused naming its PID."""
    from cli import fedbridge

    from fedbridge_shared.processes import owned_by

    root, _ = fed
    out, port, log = tmp_path / "fed", free_port(), tmp_path / "server.out"
    args = ("server", "start", "--init", root / "bridge", "--out", out, "--insecure",
            "--host", "127.0.0.1", "--port", port, "--sites", "2")  # fmt: skip
    first = launch(*args, log=log)
    started.append(first)
    state = str(tmp_path / "fed-superlink")
    _wait(lambda: "waiting for 2 site(s)" in log.read_text(), first, log, 180, "SuperLink up")
    assert owned_by(state), "the SuperLink names its state folder"
    second = fedbridge(*args[:-2], "--port", free_port(), timeout=120)
    assert second.returncode != 0 and f"(PID {first.pid})" in second.stderr, second.stderr

    os.kill(first.pid, signal.SIGKILL)  # not the tree: only the command itself
    first.wait(timeout=10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and owned_by(state):
        time.sleep(0.5)
    left = owned_by(state)
    stop_pids(left, timeout=10)  # our own orphans, by PID, if the check below fails
    assert not left, "the SuperLink outlived its coordinator"

    again = launch(*args, log=log)  # the same command starts cleanly on the same port
    started.append(again)
    _wait(lambda: log.read_text().count("waiting for 2 site(s)") == 2, again, log, 180, "restart")
    assert "stopping" not in log.read_text()  # nothing was left to clean up
