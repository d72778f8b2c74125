"""Federation cost (issue #6, part 4).

* Round wall time against the slowest site's local training, and bytes each site sends per
  round: read from the accuracy study's federated arms (Flower simulation, 3 sites; server round
  history + each site's audit log), plus the weight bytes computed from the models.
* How many simulated sites fit this machine: `fedbridge federate simulate` with a tiny timm model
  (``test_efficientnet`` at 32 px, random init) over 10, 25 and 50 sites of OCT images, one round,
  with a time limit; wall time, the lowest free memory seen during the run, success or the error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench._common import DATA, RESULTS, ROOT, WORK, Results, log

VAL_FRACTION = 0.3


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 1024
    return float("nan")


def weight_bytes(arch: str, size: int) -> dict[str, int]:
    """Bytes of the state a site receives and sends (fedbridge_shared.weights.shared_state)."""
    from fedbridge_shared.models import init_model
    from fedbridge_shared.weights import shared_state

    model, _ = init_model("none", ["a", "b", "c", "d"], arch, size)
    state = shared_state(model)
    n = sum(v.numel() * v.element_size() for v in state.values())
    params = sum(p.numel() for p in model.parameters())
    return {"bytes": int(n), "tensors": len(state), "parameters": int(params)}


def from_accuracy(mode: str) -> dict:
    """Round overheads and bytes from the federated arms of accuracy-<mode>.json."""
    path = RESULTS / f"accuracy-{mode}.json"
    if not path.exists():
        return {"missing": str(path)}
    runs = json.loads(path.read_text()).get("runs", [])
    rows = []
    for r in runs:
        for c in (r.get("cost") or {}).get("rounds", []):
            if c.get("round_s"):
                rows.append(
                    {
                        "modality": r["modality"], "seed": r["seed"], "arm": r["arm"],
                        **c,
                        "overhead_pct": 100 * (1 - c["slowest_site_train_s"] / c["round_s"]),
                        "sum_site_train_s": float(sum(c["site_train_s"])),
                    }
                )  # fmt: skip
    out: dict = {"source": path.name, "rounds": rows}
    if rows:
        out["overhead_pct_median"] = float(np.median([r["overhead_pct"] for r in rows]))
        out["round_s_median"] = float(np.median([r["round_s"] for r in rows]))
        out["slowest_site_s_median"] = float(np.median([r["slowest_site_train_s"] for r in rows]))
        out["sum_sites_over_round_median"] = float(
            np.median([r["sum_site_train_s"] / r["round_s"] for r in rows])
        )
        b = [x for r in rows for x in r["bytes_per_site"]]
        out["bytes_per_site_per_round_up"] = int(np.median(b)) if b else None
    return out


def scaling(n_sites: int, mode: str, limit_s: int) -> dict:
    from rich.console import Console

    from fedbridge_shared.data.split import split_folder
    from fedbridge_shared.spec import is_bundle
    from fedbridge_shared.training import TrainConfig, run_stage

    base = WORK / f"fedscale-{mode}" / f"sites{n_sites}"
    split = base / "split"
    if not (split / "split.csv").exists():
        shutil.rmtree(split, ignore_errors=True)
        split_folder(DATA / "oct", split, n_sites, 0.1, 0.05, seed=0)
    init = base / "init"
    if not is_bundle(init):
        run_stage("bridge", split / "bridge", out=init, init="none",
                  config=TrainConfig(epochs=1, augment_per_sample=0, preset="oct", seed=0),
                  arch="test_efficientnet", image_size=32,
                  console=Console(stderr=True, quiet=True))  # fmt: skip
    out = base / "fed"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name("fed-rounds"), ignore_errors=True)
    cmd = [str(Path(sys.executable).with_name("fedbridge")), "federate", "simulate",
           "--init", str(init), "--out", str(out), "--rounds", "1", "--local-epochs", "1",
           "--augment-per-sample", "0", "--augment", "oct", "--seed", "0",
           # with ~8 patients a site, the default 0.15 leaves every site without validation
           # patients, and Flower's weighted mean of the evaluation metrics divides by zero
           "--set", f"val-fraction={VAL_FRACTION}"]  # fmt: skip
    for i in range(1, n_sites + 1):
        cmd += ["--site", str(split / f"site-{i}")]
    lowest = [mem_available_mib()]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(1.0):
            lowest.append(mem_available_mib())

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    logf = base / "fed.log"
    t0 = time.perf_counter()
    row = {"sites": n_sites, "limit_s": limit_s, "mem_available_before_mib": lowest[0]}
    with logf.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            import os
            import signal

            os.killpg(proc.pid, signal.SIGTERM)  # the simulation and its Ray workers
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            rc = None
    stop.set()
    th.join()
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["min_mem_available_mib"] = round(min(lowest), 0)
    row["ok"] = rc == 0 and is_bundle(out)
    if rc is None:
        row["error"] = f"did not finish within {limit_s}s"
    elif not row["ok"]:
        row["error"] = f"exit {rc}: " + " ".join(logf.read_text()[-600:].split())
    if row["ok"]:
        hist = json.loads((out / "model.json").read_text())["training"]["history"]
        row["round_s"] = hist[0]["seconds"]
        row["sites_answered"] = len(hist[0]["sites"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    counts = [10] if args.quick else [10, 25, 50]
    limit = 240 if args.quick else 420
    res = Results("federation_cost", mode, {"site_counts": counts, "limit_s": limit,
                                            "tiny_model": "test_efficientnet @ 32 px",
                                            "site_val_fraction": VAL_FRACTION})  # fmt: skip
    res["weights"] = {
        "mobilenetv1_025@128": weight_bytes("mobilenetv1_025", 128),
        "mobilenetv2_100@224": weight_bytes("mobilenetv2_100", 224),
        "test_efficientnet@32": weight_bytes("test_efficientnet", 32),
    }
    res["rounds_3_sites"] = from_accuracy(mode)
    res["scaling"] = []
    for n in counts:
        log(f"federation: {n} simulated sites")
        try:
            row = scaling(n, mode, limit)
        except Exception as e:  # noqa: BLE001
            row = {"sites": n, "ok": False, "error": f"{type(e).__name__}: {e}"}
        log(f"  {row}")
        res["scaling"] = [*res["scaling"], row]
        if not row.get("ok"):
            break  # more sites will not fit either
    res.done()
    log(f"federation cost ({mode}) done in {res['wall_s']:.0f}s → {res.path}")


if __name__ == "__main__":
    main()
