"""A real federation on Flower's Deployment Engine, on loopback, with TLS and site keys.

``fedbridge server start`` (SuperLink + ServerApp run) and two ``fedbridge site join``
processes (SuperNodes) train two rounds on real chest X-rays; a third site whose key was
never registered is refused. Every process started here is stopped by PID, Flower's
``flower-superexec`` children included, and the test checks none is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli import assert_one_line_error, fedbridge, launch, ok

from fedbridge_shared.processes import alive, descendants, free_port, process_table, stop
from fedbridge_shared.spec import load_bundle


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, path.read_text(errors="replace")
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


@pytest.fixture
def started():
    """Processes started by a test; all of them (and their children) end with it."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    stop(procs, timeout=20)


def test_tls_federation_with_registered_sites_and_a_refused_one(fed, tmp_path, started):
    root, split = fed
    ok("server", "certs", "--out", tmp_path / "certs")
    for name in ("site-a", "site-b", "intruder"):
        ok("site", "keys", "--name", name, "--out", tmp_path / "keys")
    assert oct(os.stat(tmp_path / "keys" / "site-a.key").st_mode & 0o777) == "0o600"
    port = free_port()
    server_log = tmp_path / "server.out"
    server = launch(
        "server", "start",
        "--init", root / "bridge",
        "--out", tmp_path / "fed",
        "--certs", tmp_path / "certs",
        "--site-key", tmp_path / "keys" / "site-a.pub",
        "--site-key", tmp_path / "keys" / "site-b.pub",
        "--host", "127.0.0.1", "--port", port,
        "--sites", "2", "--rounds", "2",
        "--augment-per-sample", "1", "--batch-size", "32", "--lr", "0.001",
        "--test", split / "test",
        log=server_log,
    )  # fmt: skip
    started.append(server)
    for i, name in ((1, "site-a"), (2, "site-b")):
        started.append(
            launch(
                "site", "join",
                "--superlink", f"127.0.0.1:{port}",
                "--data", split / f"site-{i}",
                "--name", name,
                "--ca", tmp_path / "certs" / "ca.crt",
                "--key", tmp_path / "keys" / f"{name}.key",
                "--runtime-port", free_port(),
                "--log", tmp_path / f"{name}.log",
                log=tmp_path / f"{name}.out",
            )
        )  # fmt: skip
    # Once the SuperLink is up and has registered the two keys, an unregistered site is refused.
    _wait_for(server_log, "site-b.pub: registered", server, timeout=120)
    intruder = fedbridge(
        "site", "join",
        "--superlink", f"127.0.0.1:{port}",
        "--data", split / "site-3",
        "--name", "intruder",
        "--ca", tmp_path / "certs" / "ca.crt",
        "--key", tmp_path / "keys" / "intruder.key",
        "--runtime-port", free_port(),
        "--log", tmp_path / "intruder.log",
        "--admit-timeout", "3",
        timeout=120,
    )  # fmt: skip
    assert_one_line_error(intruder, "intruder", "did not admit this site")
    ok("server", "certs", "--out", tmp_path / "other-certs")
    wrong_ca = fedbridge(
        "site", "join",
        "--superlink", f"127.0.0.1:{port}",
        "--data", split / "site-3",
        "--name", "wrong-ca",
        "--ca", tmp_path / "other-certs" / "ca.crt",
        "--key", tmp_path / "keys" / "intruder.key",
        "--runtime-port", free_port(),
        "--log", tmp_path / "wrong-ca.log",
        "--admit-timeout", "30",
        timeout=120,
    )  # fmt: skip
    assert_one_line_error(wrong_ca, "wrong-ca", "CERTIFICATE_VERIFY_FAILED", "ca.crt")
    # From a site's position (ca.crt and the address the sites use) the Control API is closed:
    # no new site key, no list of runs, no stopping the federation.
    home = tmp_path / "rogue-flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fed"\n\n[superlink.fed]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{tmp_path / "certs" / "ca.crt"}"\n'
    )
    rogue_env = {**os.environ, "FLWR_HOME": str(home)}
    for args in (
        ["supernode", "register", str(tmp_path / "keys" / "intruder.pub"), "fed"],
        ["ls", "fed"],
        ["stop", "1", "fed"],
    ):
        done = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), *args], env=rogue_env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        text = done.stdout + done.stderr
        assert done.returncode != 0 and "403 Forbidden" in text, (args, text)

    assert server.wait(timeout=900) == 0, server_log.read_text()
    out = server_log.read_text()
    assert "TLS + auth" in out and "best round" in out
    link_log = (tmp_path / "fed-superlink" / "superlink.log").read_text()
    assert "running on https://127.0.0.1" in link_log  # TLS, not plain HTTP

    bundle = load_bundle(tmp_path / "fed")
    training = bundle.training
    assert training["stage"] == "federated" and training["rounds"] == 2
    assert [h["sites"] for h in training["history"]] == [["site-a", "site-b"]] * 2
    assert all(h["dropped"] == [] for h in training["history"])
    rounds = sorted(p.name for p in (tmp_path / "fed-rounds").glob("round-*"))
    assert rounds == ["round-0001", "round-0002"]
    assert "accuracy" in out.lower()  # test metrics printed by the ServerApp

    # each site admin saw what the site did, round by round, on the site's own console
    console = (tmp_path / "site-a.out").read_text()
    for line in ("round 1 training: ", "round 2 training: ", "round 2 evaluation: "):
        assert line in console, console
    assert "num-examples" in console or "train_loss" in console, console

    # the sites keep serving until told to stop; stop them and check nothing is left
    sites = started[1:]
    assert all(p.poll() is None for p in sites)
    tree = descendants(p.pid for p in sites)
    commands = process_table()
    assert any("flower-supernode" in commands.get(pid, (0, ""))[1] for pid in tree)
    for p in sites:
        p.send_signal(signal.SIGTERM)
    for p in sites:
        p.wait(timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(pid) for pid in tree):
        time.sleep(0.5)
    assert not [pid for pid in tree if alive(pid)], "processes left behind"


def test_server_start_refuses_to_run_without_tls_or_site_keys(fed, tmp_path):
    root, _ = fed
    no_certs = fedbridge("server", "start", "--init", root / "bridge", "--out", tmp_path / "x")
    assert_one_line_error(no_certs, "TLS is on by default", "--insecure")
    ok("server", "certs", "--out", tmp_path / "certs")
    no_keys = fedbridge(
        "server", "start", "--init", root / "bridge", "--out", tmp_path / "x",
        "--certs", tmp_path / "certs",
    )  # fmt: skip
    assert_one_line_error(no_keys, "--site-key")
    (tmp_path / "bad.pub").write_text("not a key\n")
    bad_key = fedbridge(
        "server", "start", "--init", root / "bridge", "--out", tmp_path / "x",
        "--certs", tmp_path / "certs", "--site-key", tmp_path / "bad.pub",
    )  # fmt: skip
    assert_one_line_error(bad_key, "bad.pub", "not an OpenSSH public key")
    again = fedbridge("server", "certs", "--out", tmp_path / "certs")
    assert_one_line_error(again, "ca.crt", "already exists")
    assert not (tmp_path / "x").exists()


def test_site_join_checks_its_data_and_credentials_before_connecting(fed, oct_root, tmp_path):
    _, split = fed
    no_tls = fedbridge(
        "site", "join", "--superlink", "127.0.0.1:1", "--data", split / "site-1", "--name", "a"
    )  # fmt: skip
    assert_one_line_error(no_tls, "--ca", "--insecure")
    bad_addr = fedbridge(
        "site", "join", "--superlink", "no-port", "--data", split / "site-1", "--name", "a",
        "--insecure",
    )  # fmt: skip
    assert_one_line_error(bad_addr, "HOST:PORT")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_data = fedbridge(
        "site", "join", "--superlink", "127.0.0.1:1", "--data", empty, "--name", "a", "--insecure"
    )  # fmt: skip
    assert_one_line_error(no_data, str(empty))
    bad_port = fedbridge(
        "site", "join", "--superlink", "127.0.0.1:1", "--data", split / "site-1", "--name", "a",
        "--insecure", "--runtime-port", "0",
    )  # fmt: skip
    assert_one_line_error(bad_port, "--runtime-port 0")


def test_site_join_names_the_real_cause_when_it_cannot_go_on(fed, tmp_path):
    """A runtime port in use stops at once with that cause; a coordinator that stays down ends
    the wait at --admit-timeout (the SuperNode's own retries are bounded by it too)."""
    import socket

    _, split = fed
    common = ("site", "join", "--data", split / "site-1", "--name", "a", "--insecure")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        clash = fedbridge(
            *common, "--superlink", "127.0.0.1:1", "--runtime-port", port,
            "--admit-timeout", "60", "--log", tmp_path / "clash.log", timeout=120,
        )  # fmt: skip
    assert_one_line_error(clash, f"--runtime-port {port} is in use")
    down = fedbridge(
        *common, "--superlink", f"127.0.0.1:{free_port()}", "--runtime-port", free_port(),
        "--admit-timeout", "5", "--log", tmp_path / "down.log", timeout=300,
    )  # fmt: skip
    assert_one_line_error(down, "did not admit this site", "tried for 5 s")
