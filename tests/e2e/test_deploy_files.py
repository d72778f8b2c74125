"""deploy/: the compose preparation script runs for real; container commands match the CLI.

Docker cannot run on the test machines (no daemon), so the images are not built here; what can
be checked without one is: ``prepare.sh`` lays out a working federation folder from a real split,
and every fedbridge option the Dockerfiles and compose file pass exists in the CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
