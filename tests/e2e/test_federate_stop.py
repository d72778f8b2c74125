"""`federate simulate` ends within seconds of SIGTERM, and when every site was dropped by the
round timeout: one clear message, no process or temporary folder left, only completed rounds.

Real CXR images and the tiny bridge bundle of the session fixture ``fed``.
"""

import json
import signal
import time
from pathlib import Path

from cli import fedbridge, launch

from fedbridge_shared.processes import alive, descendants, stop


def _simulate(root: Path, split: Path, out: Path, *extra: str) -> list[str]:
    sites = [a for i in (1, 2, 3) for a in ("--site", split / f"site-{i}")]
    return [
        "federate", "simulate", "--init", root / "bridge", *sites, "--out", out,
        "--augment-per-sample", "1", "--batch-size", "32", "--seed", "5", *extra,
    ]  # fmt: skip


def _completed(out: Path) -> int:
    try:
        return json.loads((out.with_name(out.name + "-rounds") / "state.json").read_text())[
            "completed"
        ]
    except (OSError, ValueError, KeyError):
        return 0


def _ray_dirs() -> set[Path]:
    return set(Path("/tmp").glob("fedbridge-ray-*"))


def test_sigterm_in_round_2_ends_the_run_keeping_round_1(fed, tmp_path):
    root, split = fed
    out, log = tmp_path / "fed", tmp_path / "run.log"
    ray_before = _ray_dirs()
    proc = launch(*_simulate(root, split, out, "--rounds", "3"), log=log)
    try:
        for _ in range(1200):  # round 1 saved: round 2 is under way (bounded: 10 min)
            if _completed(out) >= 1 or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert proc.poll() is None and _completed(out) == 1, log.read_text()[-3000:]
        children = descendants([proc.pid]) - {proc.pid}
        assert children, "the simulation runs Ray worker processes"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
    finally:
        stop([proc])
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert "stopped on request" in text and "rerun the same command to resume" in text, text[-3000:]
    assert "Rounds up to 1 are saved" in text
    assert "Traceback" not in text.split("stopped on request")[-1]
    for _ in range(50):  # Ray's processes end as their parent goes (bounded)
        if not any(alive(p) for p in children):
            break
        time.sleep(0.2)
    assert not [p for p in children if alive(p)], "processes left behind"
    assert _ray_dirs() == ray_before, "Ray's temporary folder left behind"
    rounds = out.with_name("fed-rounds")
    assert sorted(d.name for d in rounds.iterdir() if d.name.startswith("round-")) == ["round-0001"]
    assert not out.exists(), "no final bundle from a stopped run"
    assert not [p for p in rounds.rglob("*") if p.name.startswith(".")], "partial files"


def test_every_site_dropped_by_the_round_timeout_ends_the_run_with_a_clear_message(fed, tmp_path):
    root, split = fed
    out = tmp_path / "fed"
    ray_before = _ray_dirs()
    # one second is too short for any site to train a round: all three are dropped, and the
    # default quorum is a majority of the 3 sites (2)
    result = fedbridge(
        *_simulate(root, split, out, "--rounds", "2", "--set", "round-timeout=1"), timeout=300
    )
    assert result.returncode != 0
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: round 1: 0 usable update(s), fewer than the quorum of 2"), (
        result.stderr[-3000:]
    )
    assert "no reply before the round timeout" in err and "rerun the same command" in err
    assert _ray_dirs() == ray_before
    assert not out.exists() and _completed(out) == 0
