"""``flwr run .`` from the repository root runs the fedbridge app in Flower's simulation.

Flower starts a detached local SuperLink that outlives the command; the test gives it its own
FLWR_HOME and ports, finds it by its log-file path under that FLWR_HOME, and stops it by PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedbridge_shared.processes import alive, descendants, free_port, process_table, stop_pids
from fedbridge_shared.spec import load_bundle

REPO = Path(__file__).resolve().parents[2]


def _local_superlinks(flwr_home: Path) -> list[int]:
    marker = f"{flwr_home}/local-superlink/"
    return [
        pid
        for pid, (_, cmd) in process_table().items()
        if "flower-superlink" in cmd and marker in cmd
    ]


def test_flwr_run_dot_simulates_three_sites(fed, tmp_path):
    root, split = fed
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 3\n"
    )
    sites = ",".join(str(split / f"site-{i}") for i in (1, 2, 3))
    overrides = (
        f"init='{root / 'bridge'}' out='{tmp_path / 'fed'}' simulation-sites='{sites}' "
        "num-server-rounds=1 augment-per-sample=1 batch-size=32 "
        "min-train-sites=3 min-evaluate-sites=3 min-available-sites=3"
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    try:
        result = subprocess.run(
            ["flwr", "run", ".", "local", "--stream", "--run-config", overrides],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        links = _local_superlinks(home)
        tree = descendants(links)
        stop_pids(tree, timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 1/1  sites 3" in result.stdout, result.stdout
    assert links, "flwr run did not start a local SuperLink under our FLWR_HOME"
    assert not any(alive(p) for p in tree)
    bundle = load_bundle(tmp_path / "fed")
    assert bundle.training["stage"] == "federated" and bundle.training["rounds"] == 1
