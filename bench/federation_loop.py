"""Seconds a 3-round run loses to a site lost after round 1, on the fake Grid and fake clock
of ``tests/server/test_round_loop.py`` (no real waiting): the fixed loop vs the loop as it was
(every training wait = join-timeout, every wait expecting all sites).

Run from the repo root with the README's PYTHONPATH: ``python bench/federation_loop.py``.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path


def main() -> None:
    sys.path[:0] = ["tests/server", "tests"]
    from flwr.supercore.task_identity import TaskIdentity

    from fedbridge_server import round_loop
    from fedbridge_shared.models import init_model
    from fedbridge_shared.spec import save_bundle

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    t = importlib.import_module("test_round_loop")
    tmp = Path(tempfile.mkdtemp())
    model, spec = init_model("none", t.LABELS, "test_efficientnet", 32)
    bridge = save_bundle(tmp / "bridge", spec, model.state_dict())

    def run(name: str, lose: bool) -> tuple[float, list[float]]:
        sites = t._sites(c={"leave_after": (1, "evaluate")}) if lose else t._sites()
        summary, clock, _ = t._run(bridge, tmp / name, sites)
        return clock.t, [h["seconds"] for h in summary["history"]]

    after = (run("a-lost", True), run("a-all", False))
    wait = round_loop.RoundLoop.wait

    def old_wait(self, rnd, phase, *, quorum, timeout):  # the loop before the fix
        cfg = self.fed.cfg
        self.expected = cfg.min_available_sites
        timeout = cfg.join_timeout if phase == "training" else cfg.site_wait_timeout
        return wait(self, rnd, phase, quorum=quorum, timeout=timeout)

    round_loop.RoundLoop.wait = old_wait
    before = (run("b-lost", True), run("b-all", False))
    for label, ((lost, rounds), (full, _)) in (("before", before), ("after", after)):
        print(
            f"{label}: lost-site run {lost:.1f} s (rounds {rounds}), all-sites run {full:.1f} s, "
            f"lost {lost - full:.1f} s"
        )


if __name__ == "__main__":
    main()
