"""Sites run only code their admin trusts: a foreign app submitted with `flwr run` on the
coordinator host, during a real fedbridge run, gets nothing from the sites — no file names,
paths, pixels or node config — and each site's console and audit say that an unknown app
asked. The fedbridge run itself completes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from cli import launch
from foreign import assert_refused, attack, audit_refusals, foreign_app

from fedbridge_client.guard import app_problem
from fedbridge_server.config import FederationConfig
from fedbridge_server.deploy import write_app
from fedbridge_shared.processes import free_port, stop


def _fab(app: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app)


def test_only_fedbridges_own_app_passes_the_check(fed, tmp_path):
    root, _ = fed
    cfg = FederationConfig.from_flat({"init": str(root / "bridge")})
    assert app_problem(_fab(write_app(tmp_path / "ours", cfg))) is None
    why = app_problem(_fab(foreign_app(tmp_path, tmp_path / "x.json")))
    assert why is not None and "ships files of its own" in why


def _wait(path: Path, text: str, procs, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = path.read_text(errors="replace") if path.exists() else ""
        if text in body:
            return body
        for p in procs:
            assert p.poll() is None, f"{p.args} ended: {body[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s: {body[-3000:]}")


def test_a_foreign_app_gets_nothing_from_the_sites(fed, tmp_path):
    root, split = fed
    port, out = free_port(), tmp_path / "fed"
    procs: list[subprocess.Popen] = []
    try:
        server = launch(
            "server", "start", "--init", root / "bridge", "--out", out, "--insecure",
            "--host", "127.0.0.1", "--port", port, "--sites", "2", "--rounds", "3",
            "--augment-per-sample", "1", "--batch-size", "32", "--lr", "0.001",
            "--labels", ",".join(sorted(p.name for p in (split / "site-1").iterdir())),
            log=tmp_path / "server.out",
        )  # fmt: skip
        procs.append(server)
        for i, name in ((1, "site-a"), (2, "site-b")):
            procs.append(launch(
                "site", "join", "--superlink", f"127.0.0.1:{port}", "--data", split / f"site-{i}",
                "--name", name, "--insecure", "--runtime-port", free_port(),
                "--audit-dir", tmp_path / f"audit-{name}", "--log", tmp_path / f"{name}.log",
                log=tmp_path / f"{name}.out",
            ))  # fmt: skip
        _wait(tmp_path / "server.out", "round 1/3", procs, 600)
        # the attack: another app, submitted on the coordinator host with the run's flwr home
        home = out.with_name("fed-superlink") / "flwr-home"
        got, text = attack(tmp_path, home, sites=2)
        assert_refused(got, text, 2, [split])
        for name in ("site-a", "site-b"):
            console = _wait(tmp_path / f"{name}.out", "unknown app asked", procs, 60)
            assert "evil" in console  # the admin sees which app asked
            refused = audit_refusals(tmp_path / f"audit-{name}")
            assert refused and refused[0]["fab_id"] == "evil/evil", refused
        # fedbridge's own run goes on and ends with its bundle
        assert server.wait(timeout=600) == 0, (tmp_path / "server.out").read_text()[-3000:]
        assert (out / "model.json").is_file()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        stop(procs, timeout=30)
