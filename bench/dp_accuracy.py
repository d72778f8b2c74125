"""Differential privacy (issue #12): federated OCT accuracy vs the privacy budget ε.

One patient-level OCT split (bridge / site-1..3 / test) and one bridge model, then the same
federation (3 sites, FedAvg, same seed and rounds) once per ε in {∞ (DP off), 8, 3, 1}, run
in-process through the product's own `fedbridge.simulate.simulate` with the run-config keys
``dp.enabled`` / ``dp.target-epsilon`` (σ derived from ε by the server's Opacus accountant) and
the default clipping norm ``dp.clipping-norm = 1.0``. Each final bundle is assessed on the
held-out test patients with `evaluate_bundle`.

Per arm and round we record the median L2 norm of the sites' updates over the trainable weights
and the fraction above the clipping norm: from the server's privacy record under DP, and for
every arm (the ε = ∞ one included: there nothing is clipped, the fraction is what *would* be)
from a ClientApp mod that measures each site's reply against the weights it was sent. Also: σ,
the noise std per coordinate (σ·C/m), ε spent, accuracy, macro AUC with bootstrap CIs, and the
CPU seconds of the driver plus every process it started (Ray workers included).

Scratch files go to $FEDBRIDGE_BENCH_WORK-dp (default /tmp/fedbridge-bench-dp); the split and the
bridge bundle are cached there, the federated arms always rerun. Results go to
bench/results/dp_accuracy-<mode>.json after every arm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import DATA, WEIGHTS, WORK, Results, log

EPSILONS: list[float | None] = [None, 8.0, 3.0, 1.0]  # None: DP off (ε = ∞)
QUICK = {
    "arch": "mobilenetv1_025",
    "image_size": 128,
    "init": str(WEIGHTS / "mobilenetv1_025_tfslim_quant_in1k_128.safetensors"),
    "sites": 3,
    "bridge_fraction": 0.3,
    "test_fraction": 0.2,
    "seed": 0,
    "bridge_epochs": 3,
    "rounds": 3,
    "local_epochs": 1,
    "augment_per_sample": 2,
    "augment": "oct",
    "batch_size": 16,
    "lr": 2e-3,  # the accuracy study's learning rate for this model
    "clipping_norm": 1.0,
    "delta": 1e-5,
    "epsilons": EPSILONS,
    "bootstrap": 200,
}
FULL = {**QUICK, "rounds": 5, "augment_per_sample": 10, "bootstrap": 1000}
CXR = {
    **QUICK,
    "data": "cxr",
    "augment": "cxr",
    "rounds": 2,
    "augment_per_sample": 0,
    "bootstrap": 100,
    "max_grad_norm": 1.0,
    # (level, ε): DP off, site-level (the coordinator noises each site's update) and record-level
    # DP-SGD (each site noises its patients' gradients, ε per patient)
    "arms": [(None, None), ("site", 8.0), ("site", 1.0), ("record", 8.0), ("record", 1.0)],
}
DP_WORK = WORK.with_name(WORK.name + "-dp")


# ---------------------------------------------------------------- measurement helpers


class UpdateNorms:
    """ClientApp mod: the L2 norm of each site's training update over the trainable weights
    (reply minus the global weights it was sent), one JSON line per site and round."""

    def __init__(self, folder: Path, trainable: list[tuple[int, int]]) -> None:
        self.folder = str(folder)
        self.trainable = list(trainable)  # [start, end) of each trainable tensor in the vector

    def __call__(self, msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train":
            return reply
        try:
            sent = msg.content["arrays"]["weights"].numpy()  # packed: see weights.pack
            got = reply.content["arrays"]["weights"].numpy()
            sq = sum(
                float(((got[a:b].astype("float64") - sent[a:b]) ** 2).sum())
                for a, b in self.trainable
            )
            line = {
                "round": int(msg.content["config"]["server-round"]),
                "partition": int(context.node_config["partition-id"]),
                "norm": math.sqrt(sq),
            }
        except Exception as e:  # noqa: BLE001 - a failed reply is the federation's business
            line = {"error": f"{type(e).__name__}: {e}"[:300]}
        part = context.node_config.get("partition-id", "x")
        with open(os.path.join(self.folder, f"norms-p{part}.jsonl"), "a") as fh:
            fh.write(json.dumps(line) + "\n")
        return reply


if __name__ != "__main__":  # Ray actors unpickle the mod: ship this module's code by value
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CpuMeter:
    """CPU seconds (user + system) of this process and of every process it starts (Ray's GCS,
    raylet and workers), read from /proc every ``interval`` s; a process that exits between two
    reads loses at most its last ``interval`` of CPU."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.seen: dict[tuple[int, int], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CpuMeter:
        r = resource.getrusage(resource.RUSAGE_SELF)
        self._self0 = r.ru_utime + r.ru_stime
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        r = resource.getrusage(resource.RUSAGE_SELF)
        self.self_s = r.ru_utime + r.ru_stime - self._self0
        self.children_s = sum(self.seen.values()) / self.tick
        self.processes = len(self.seen)
        self.total_s = self.self_s + self.children_s

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        stats: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, ticks, start time)
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                text = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            f = text[text.rindex(")") + 2 :].split()
            stats[int(d)] = (int(f[1]), int(f[11]) + int(f[12]), int(f[19]))
        kids: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            kids.setdefault(ppid, []).append(pid)
        todo, me = list(kids.get(os.getpid(), [])), os.getpid()
        while todo:
            pid = todo.pop()
            if pid == me:
                continue
            _, ticks, start = stats[pid]
            key = (pid, start)
            self.seen[key] = max(self.seen.get(key, 0), ticks)
            todo += kids.get(pid, [])


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s, n = sorted(xs), len(xs)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def quiet_console(path: Path | None = None):
    from rich.console import Console

    if path is None:
        return Console(stderr=True, quiet=True)
    return Console(file=path.open("w"), width=160)


# ---------------------------------------------------------------- stages


def make_split(cfg: dict, base: Path) -> Path:
    from fedbridge_shared.data.split import split_folder

    out = base / "split"
    if not (out / "split.csv").exists():
        shutil.rmtree(out, ignore_errors=True)
        split_folder(DATA / cfg.get("data", "oct"), out, cfg["sites"], cfg["bridge_fraction"],
                     cfg["test_fraction"], cfg["seed"])  # fmt: skip
    return out


def part_counts(split: Path) -> dict[str, dict[str, int]]:
    import csv

    counts: dict[str, dict[str, Any]] = {}
    with (split / "split.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            c = counts.setdefault(r["part"], {"images": 0, "patients": set()})
            c["images"] += 1
            c["patients"].add(r["patient_id"])
    return {k: {"images": v["images"], "patients": len(v["patients"])} for k, v in counts.items()}


def bridge(cfg: dict, split: Path, base: Path) -> tuple[Path, dict[str, Any]]:
    from fedbridge_shared.spec import is_bundle
    from fedbridge_shared.training import TrainConfig, run_stage

    out = base / "bridge"
    if is_bundle(out):
        return out, {"cached": True}
    config = TrainConfig(
        epochs=cfg["bridge_epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
        augment_per_sample=0, preset=cfg["augment"], online_augment=True, seed=cfg["seed"],
    )  # fmt: skip
    t0 = time.perf_counter()
    with CpuMeter() as cpu:
        run_stage(
            "bridge", split / "bridge", out=out, init=cfg["init"], config=config,
            arch=cfg["arch"], image_size=cfg["image_size"], device="cpu", console=quiet_console(),
        )  # fmt: skip
    return out, {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu.total_s, 1)}


def trainable_keys(bundle: Path) -> list[str]:
    from fedbridge_shared.models import model_from_bundle
    from fedbridge_shared.spec import load_bundle

    model = model_from_bundle(load_bundle(bundle))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_spans(bundle: Path, trainable: list[str]) -> list[tuple[int, int]]:
    """Where each trainable tensor sits in the packed weight vector (weights.pack order)."""
    from fedbridge_shared.models import model_from_bundle
    from fedbridge_shared.spec import load_bundle
    from fedbridge_shared.weights import shared_state

    spans, start, keep = [], 0, set(trainable)
    for name, t in shared_state(model_from_bundle(load_bundle(bundle))).items():
        if name in keep:
            spans.append((start, start + t.numel()))
        start += t.numel()
    return spans


def federate(cfg: dict, eps: float | None, init: Path, sites: list[Path], out: Path,
             trainable: list[str], level: str = "site") -> dict[str, Any]:  # fmt: skip
    from fedbridge.simulate import simulate
    from fedbridge_shared.spec import load_bundle

    for p in (out, out.with_name(out.name + "-rounds"), out.with_name(out.name + "-norms")):
        shutil.rmtree(p, ignore_errors=True)
    norms_dir = out.with_name(out.name + "-norms")
    norms_dir.mkdir(parents=True)
    flat: dict[str, Any] = {
        "init": str(init),
        "out": str(out),
        "num-server-rounds": cfg["rounds"],
        "local-epochs": cfg["local_epochs"],
        "augment-per-sample": cfg["augment_per_sample"],
        "augment": cfg["augment"],
        "batch-size": cfg["batch_size"],
        "lr": cfg["lr"],
        "seed": cfg["seed"],
        "min-available-sites": cfg["sites"],
        "min-train-sites": cfg["sites"],
        "min-evaluate-sites": cfg["sites"],
    }
    if eps is not None:
        flat |= {
            "dp.enabled": True,
            "dp.target-epsilon": eps,
            "dp.delta": cfg["delta"],
            "dp.clipping-norm": cfg["clipping_norm"],
            "dp.level": level,
        }
        if level == "record":
            flat["dp.max-grad-norm"] = cfg.get("max_grad_norm", 1.0)
    t0 = time.perf_counter()
    with CpuMeter() as cpu:
        simulate(flat, sites, out=quiet_console(out.with_name(out.name + ".log")),
                 mods=[UpdateNorms(norms_dir, trainable_spans(init, trainable))])  # fmt: skip
    wall = time.perf_counter() - t0
    training = load_bundle(out).training
    measured: dict[int, list[float]] = {}
    errors = []
    for f in sorted(norms_dir.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            if "error" in e:
                errors.append(e["error"])
            else:
                measured.setdefault(e["round"], []).append(e["norm"])
    rounds = []
    for h in training.get("history", []):
        r, pv = int(h["round"]), h.get("privacy") or {}
        ns = measured.get(r, [])
        rounds.append(
            {
                "round": r,
                "sites": len(h.get("sites", [])),
                "site_update_norms": sorted(ns),
                "update_norm_median": pv.get("update_norm_median", _median(ns)),
                "clipped_fraction": pv.get(
                    "clipped_fraction",
                    sum(n > cfg["clipping_norm"] for n in ns) / len(ns) if ns else None,
                ),
                "update_norm_median_measured": _median(ns),
                "noise_std": pv.get("noise_std", 0.0),
                "epsilon": pv.get("epsilon"),
                "train_loss": h.get("train_loss"),
                "federated_val_loss": h.get("federated_val_loss"),
                "federated_val_accuracy": h.get("federated_val_accuracy"),
                "seconds": h.get("seconds"),
            }
        )
    return {
        "released": training.get("released", "dp"),
        "dp_bundle": training.get("dp_bundle", str(out)),
        "start_val_accuracy": training.get("start_val_accuracy"),
        "dp_val_accuracy": training.get("dp_val_accuracy"),
        "privacy": training.get("privacy"),
        "best_round": training.get("best_round"),
        "rounds": rounds,
        "mod_errors": errors,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu.total_s, 1),
        "cpu_driver_s": round(cpu.self_s, 1),
        "cpu_children_s": round(cpu.children_s, 1),
        "cpu_processes": cpu.processes,
    }


def assess(bundle: Path, test: Path, n_bootstrap: int) -> dict[str, Any]:
    from fedbridge_shared.assessment import evaluate_bundle

    metrics, _, _ = evaluate_bundle(bundle, test, n_bootstrap=n_bootstrap, device="cpu",
                                    console=quiet_console())  # fmt: skip
    keep = ("n", "accuracy", "macro_auc", "sensitivity_mean", "f1_mean", "ci95",
            "confusion_matrix", "labels")  # fmt: skip
    return {k: metrics[k] for k in keep if k in metrics}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 rounds, ×2 expansion, 200 resamples")
    p.add_argument(
        "--cxr",
        action="store_true",
        help="CXR, 2 rounds, site- and record-level DP at ε 8 and 1 (~15 CPU-min)",
    )
    args = p.parse_args()
    mode = "cxr" if args.cxr else "quick" if args.quick else "full"
    cfg = CXR if args.cxr else QUICK if args.quick else FULL
    base = DP_WORK / f"dp-{mode}"
    base.mkdir(parents=True, exist_ok=True)
    data = str(DATA / cfg.get("data", "oct"))
    res = Results("dp_accuracy", mode, {**cfg, "data": data, "work": str(base)})
    res["runs"] = []
    split = make_split(cfg, base)
    res["split"] = part_counts(split)
    log(f"dp_accuracy ({mode}): bridge stage ({cfg['arch']} @ {cfg['image_size']} px)")
    init, info = bridge(cfg, split, base)
    res["bridge"] = {"bundle": str(init), **info, **assess(init, split / "test", cfg["bootstrap"])}
    trainable = trainable_keys(init)
    res["trainable_parameters"] = n_train = _count(init, trainable)
    sites = [split / f"site-{i}" for i in range(1, cfg["sites"] + 1)]
    arms = cfg.get("arms") or [("site" if e else None, e) for e in cfg["epsilons"]]
    for level, eps in arms:
        name = "inf" if eps is None else f"{level}-{eps:g}"
        log(f"arm {level or 'no DP'} ε = {'∞' if eps is None else f'{eps:g}'}")
        row: dict[str, Any] = {"epsilon_target": eps, "dp": eps is not None, "level": level}
        t0 = time.perf_counter()
        try:
            out = base / f"fed-eps-{name}"
            row.update(federate(cfg, eps, init, sites, out, trainable, level or "site"))
            # the DP model itself (set aside when it validated below its start: release rule)
            row["metrics"] = assess(Path(row["dp_bundle"]), split / "test", cfg["bootstrap"])
            pv = row["privacy"] or {}
            if pv and level == "site":
                std = pv["noise_multiplier"] * pv["clipping_norm"] / cfg["sites"]
                row["noise_std_per_coordinate"] = std
                # ‖noise‖ ≈ std·√d against a mean clipped update of norm ≤ C
                row["noise_l2_expected"] = std * math.sqrt(n_train)
        except Exception as e:  # noqa: BLE001 - one failed arm is recorded, the rest go on
            row["error"] = f"{type(e).__name__}: {e}"[-2000:]
            log(f"  FAILED: {row['error'][:300]}")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if "metrics" in row:
            m, pv = row["metrics"], row.get("privacy") or {}
            sigma = pv.get("noise_multiplier") or max((pv.get("noise_multiplier_per_site") or
                                                      {0: 0}).values())  # fmt: skip
            log(f"  accuracy {m['accuracy']:.3f}  macro AUC {m.get('macro_auc') or 0:.3f}  "
                f"σ {sigma:.3f}  ε {pv.get('epsilon', math.inf):.2f}  "
                f"cpu {row['cpu_s']:.0f}s  ({row['seconds']:.0f}s)")  # fmt: skip
        res["runs"] = [*res["runs"], row]
    res.done()
    log(f"dp_accuracy ({mode}) done in {res['wall_s']:.0f}s → {res.path}")


def _count(bundle: Path, trainable: list[str]) -> int:
    from fedbridge_shared.spec import load_bundle

    state = load_bundle(bundle).state_dict
    return int(sum(state[k].numel() for k in trainable))


if __name__ == "__main__":
    main()
