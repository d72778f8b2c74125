"""`make bench` / `make bench-quick`: every benchmark in turn, then BENCHMARKS.md.

Each script runs in its own process, so one failing benchmark does not stop the others; each
writes its JSON to bench/results/ as it goes. The order puts the short benchmarks first and the
long accuracy study last.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench._common import Results, log

SCRIPTS = (
    "train_throughput", "edge_speed", "edge_serve", "calibration", "federation_cost",
    "deployed_rounds",
    "dp_accuracy", "recipe", "accuracy",
)  # fmt: skip


def main() -> None:
    quick = "--quick" in sys.argv
    mode = "quick" if quick else "full"
    res = Results("run", mode, {"scripts": list(SCRIPTS)})
    steps = []
    for name in SCRIPTS:
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
        log(f"=== {name} ({mode}) ===")
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        steps.append({"script": name, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)})
        res["steps"] = steps
        log(f"=== {name}: exit {rc} after {steps[-1]['wall_s']:.0f}s ===")
    res.done()
    subprocess.run([sys.executable, "-m", "bench.report"])
    log(f"bench ({mode}) finished in {res['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
