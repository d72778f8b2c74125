"""deploy/: the compose preparation script runs for real; container commands match the CLI.

Docker cannot run on the test machines (no daemon), so the images are not built here; what can
be checked without one is: ``prepare.sh`` lays out a working federation folder from a real split,
and every fedbridge option the Dockerfiles and compose file pass exists in the CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from cli import ok
from cryptography import x509

from fedbridge_shared.training import usable_index

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def test_prepare_sh_lays_out_three_sites_with_their_own_keys_and_manifests(fed, tmp_path):
    root, split = fed
    target = tmp_path / "fed"
    env = {
        **os.environ,
        "FED_DIR": str(target),
        "ENV_FILE": str(tmp_path / ".env"),
        "FEDBRIDGE_UID": "10001",
        "FEDBRIDGE_GID": "10002",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    subprocess.run(
        ["sh", str(DEPLOY / "compose" / "prepare.sh"), str(split), str(root / "bridge")],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    cert = x509.load_pem_x509_certificate((target / "certs" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator" in names.get_values_for_type(x509.DNSName)
    assert sorted(p.name for p in (target / "keys").iterdir()) == [
        "site-1.pub",
        "site-2.pub",
        "site-3.pub",
    ]
    for i in (1, 2, 3):
        secrets = target / "secrets" / f"site-{i}"
        assert sorted(p.name for p in secrets.iterdir()) == ["ca.crt", "site.key"]
        assert oct((secrets / "site.key").stat().st_mode & 0o777) == "0o600"
        site = target / "data" / f"site-{i}"
        index = usable_index(site)
        original = usable_index(split / f"site-{i}")
        # same images and the same patients as in the split (the manifest travelled along)
        assert sorted((s.path.name, s.patient_id) for s in index.samples) == sorted(
            (s.path.name, s.patient_id) for s in original.samples
        )
    assert json.loads((target / "bridge" / "model.json").read_text())["format"]
    assert usable_index(target / "test").samples
    # compose runs the containers as the user who prepared the folder (here: the given UID)
    assert (tmp_path / ".env").read_text() == "FEDBRIDGE_UID=10001\nFEDBRIDGE_GID=10002\n"
    assert all((target / "state" / f"site-{i}").is_dir() for i in (1, 2, 3))


def _cli_options(*command: str) -> set[str]:
    help_text = ok(*command, "--help").stdout
    return set(re.findall(r"--[a-z][a-z0-9-]+", help_text))


def _dockerfile_argv(path: Path, instruction: str) -> list[str]:
    text = path.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(instruction + " "))
    return json.loads(line[len(instruction) + 1 :])


def _options(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def test_container_commands_use_real_cli_options():
    server = _cli_options("server", "start")
    site = _cli_options("site", "join")
    coord_file = DEPLOY / "coordinator" / "Dockerfile"
    site_file = DEPLOY / "site" / "Dockerfile"
    assert _dockerfile_argv(coord_file, "ENTRYPOINT") == ["fedbridge", "server", "start"]
    assert _options(_dockerfile_argv(coord_file, "CMD")) <= server
    entry = _dockerfile_argv(site_file, "ENTRYPOINT")
    assert entry[:3] == ["fedbridge", "site", "join"] and _options(entry) <= site
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert _options(services["coordinator"]["command"]) <= server
    sites = [n for n in services if n.startswith("site-")]
    assert len(sites) == 3
    keys = [a for a in services["coordinator"]["command"] if a.startswith("--site-key=")]
    assert len(keys) == 3 and "--sites=3" in services["coordinator"]["command"]
    for name in sites:
        command = services[name]["command"]
        assert _options(command) <= site and f"--name={name}" in command
        # each site sees only its own images, read-only
        mounts = services[name]["volumes"]
        assert f"./fed/data/{name}:/data:ro" in mounts
        assert all(name in m for m in mounts)


UNITS = [
    DEPLOY / "systemd" / "fedbridge-coordinator.service",
    DEPLOY / "systemd" / "fedbridge-site.service",
    DEPLOY / "jetson" / "fedbridge-edge.service",
]


def test_systemd_units_verify_and_run_the_real_cli(tmp_path):
    """``systemd-analyze verify`` (every key known, every value parsed, the command present)
    on the units, with the venv path pointed at this checkout's fedbridge."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    fedbridge_bin = Path(sys.executable).parent / "fedbridge"
    for unit in UNITS:
        text = unit.read_text()
        assert "/opt/fedbridge/venv/bin/fedbridge" in text  # the venv install.sh creates
        (tmp_path / unit.name).write_text(
            text.replace("/opt/fedbridge/venv/bin/fedbridge", str(fedbridge_bin)).replace(
                "/etc/fedbridge/", f"{tmp_path}/"
            )
        )
        argv = re.search(r"^ExecStart=\S+ (.*)$", text, re.M).group(1).split()
        role = [a for a in argv if not a.startswith(("$", "-", "/"))][:2]
        options = _options(argv)
        if options:  # the options the unit passes exist in that command
            assert options <= _cli_options(*role), (unit.name, options)
    for env in ("coordinator", "site"):
        example = (DEPLOY / "systemd" / f"{env}.env.example").read_text()
        args = re.search(r"^FEDBRIDGE_ARGS=(.*)$", example, re.M).group(1).split()
        command = ("server", "start") if env == "coordinator" else ("site", "join")
        assert _options(args) <= _cli_options(*command), env
        (tmp_path / f"{env}.env").write_text(example)
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / u.name) for u in UNITS)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_install_sh_creates_the_venv_the_units_expect(tmp_path):
    """A rehearsal install of the bedside role under a temporary root: the venv the unit runs
    exists and its fedbridge works, the unit is in place, no torch came along."""
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    base = Path(sys.base_prefix) / "bin" / "python3"
    env |= {"FEDBRIDGE_ROOT": str(root), "PYTHON": str(base if base.exists() else sys.executable)}
    done = subprocess.run(
        ["sh", str(DEPLOY / "systemd" / "install.sh"), "edge"],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    fedbridge_bin = root / "opt/fedbridge/venv/bin/fedbridge"
    assert (root / "etc/systemd/system/fedbridge-edge.service").is_file()
    help_text = subprocess.run(
        [str(fedbridge_bin), "edge", "serve", "--help"], env=env, capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "--port" in help_text.stdout, help_text.stderr
    no_torch = subprocess.run(
        [str(root / "opt/fedbridge/venv/bin/python"), "-c", "import torch"], env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    # the edge venv sees the system's packages (JetPack's TensorRT); torch must not be there
    assert no_torch.returncode != 0 or "site-packages" not in no_torch.stdout
    wrong = subprocess.run(
        ["sh", str(DEPLOY / "systemd" / "install.sh"), "bedside"], env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert wrong.returncode == 2 and "expected coordinator, site or edge" in wrong.stderr


def test_the_site_entrypoint_runs_as_a_non_root_uid(cxr_root, tmp_path):
    """The site container's command as UID 10001 (not root, no home): the site worker starts,
    the SuperNode runs and writes its log, and an unreachable coordinator ends in one line."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to switch to another UID")
    as_10001 = ["setpriv", "--reuid", "10001", "--regid", "10001", "--clear-groups"]
    probe = subprocess.run(
        [*as_10001, sys.executable, "-c",
         "import subprocess, sys; subprocess.run([sys.executable, '-c', '0'], check=True)"],
        capture_output=True, text=True, cwd="/", timeout=120,
    )  # fmt: skip
    if probe.returncode != 0:  # e.g. a venv whose base interpreter lives under a 0700 /root
        pytest.skip(f"UID 10001 cannot run this venv's interpreter {sys.executable} here")
    from badinputs import make_class_tree

    base = Path(tempfile.mkdtemp(prefix="fedbridge-nonroot-"))  # readable by another UID
    try:
        base.chmod(0o755)
        data = make_class_tree(base / "data", cxr_root, per_class=3)
        ok("server", "certs", "--out", base / "certs")
        ok("site", "keys", "--name", "site-1", "--out", base / "keys")
        state = base / "site"
        state.mkdir()
        for path in [state, *base.rglob("*")]:
            os.chown(path, 10001, 10001)
        entry = _dockerfile_argv(DEPLOY / "site" / "Dockerfile", "ENTRYPOINT")
        argv = [
            {"/data": str(data), "/secrets/ca.crt": str(base / "certs" / "ca.crt"),
             "/secrets/site.key": str(base / "keys" / "site-1.key"),
             "/site/supernode.log": str(state / "supernode.log")}.get(a, a)
            for a in entry[3:]
        ]  # fmt: skip
        env = {**os.environ, "HOME": "/nonexistent"}
        done = subprocess.run(
            [*as_10001, sys.executable, "-m", "fedbridge", "site", "join", *argv,
             "--superlink", f"127.0.0.1:{_closed_port()}", "--name", "site-1",
             "--admit-timeout", "5", "--runtime-port", str(_closed_port())],
            env=env, capture_output=True, text=True, timeout=600, cwd=state,
        )  # fmt: skip
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert "did not admit this site" in done.stderr, done.stderr
        assert "site worker ready" in done.stdout, done.stdout
        assert (state / "supernode.log").stat().st_uid == 10001
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _closed_port() -> int:
    from fedbridge_shared.processes import free_port

    return free_port()


def test_compose_runs_as_the_preparing_user_and_returns_when_the_run_ends():
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    for name, service in services.items():
        assert service["user"].startswith("${FEDBRIDGE_UID:?"), name  # never a baked-in UID
        assert service["environment"]["HOME"], name  # a writable HOME for any UID
    assert "--rounds=${FEDBRIDGE_ROUNDS:-5}" in services["coordinator"]["command"]
    for name in (n for n in services if n.startswith("site-")):
        assert f"./fed/state/{name}:/site" in services[name]["volumes"]
    header = (DEPLOY / "compose" / "docker-compose.yml").read_text()
    assert "--abort-on-container-exit --exit-code-from coordinator" in header
    for path in ("coordinator", "site"):
        dockerfile = (DEPLOY / path / "Dockerfile").read_text()
        installs = [ln for ln in dockerfile.splitlines() if "pip install" in ln and "." in ln]
        assert installs and all("-c constraints.txt" in ln for ln in installs), path
