"""Accuracy study on the real images in ../shared/data (issue #6, part 1).

Per modality and seed: one patient-level split (bridge / site-1..3 / test, the sites together at
the paper's target size), the same split with label-skewed sites (``--skew 0.5``: bridge, test
and the pooled site patients are identical), then the arms below, all through the product's own
functions (split_folder, run_stage, evaluate_bundle) and CLI (`fedbridge federate simulate`):

* central       ImageNet → bridge → pooled target (×N expansion)     [the paper's pipeline]
* no-imagenet   random init → bridge → target
* no-bridge     ImageNet → target
* no-augment    ImageNet → bridge → target, no expansion, no online augmentation
* fed-iid       ImageNet → bridge → FedAvg over the 3 IID sites, rounds × local epochs = epochs
* fed-skew      the same over the label-skewed sites
* local-iid     ImageNet → bridge → each IID site alone (mean of the 3 site models)
* local-skew    the same on the skewed sites

Every model is assessed on the held-out test patients with the paper's metrics and bootstrap CIs.
Results go to bench/results/accuracy-<mode>.json after every arm.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import DATA, ROOT, WORK, Results, log

PAPER = {
    "cxr": {"accuracy": 0.944, "macro_auc": 0.979},
    "oct": {"accuracy": 0.94, "macro_auc": 0.983},
}

MAIN = ["central", "fed-iid", "fed-skew", "local-iid", "local-skew"]
ABLATIONS = ["no-imagenet", "no-bridge", "no-augment"]
FULL = {
    "arch": "mobilenetv1_025",
    "image_size": 128,
    "seeds": [0, 1, 2],
    "bridge_epochs": 3,
    "target_epochs": 2,
    "augment_per_sample": 10,
    "rounds": 2,
    "local_epochs": 1,
    "batch_size": 16,
    "lr": 2e-3,  # chosen on validation accuracy (CXR seed 0) from {5e-4, 2e-3}
    "skew_alpha": 0.5,
    "bootstrap": 1000,
    # arm -> seeds it runs for (None: every seed); seeds run outermost so a cut-short run
    # still has every modality
    "modalities": {
        "cxr": {**dict.fromkeys(MAIN), **dict.fromkeys(ABLATIONS, [0])},
        "oct": {**dict.fromkeys(MAIN), **dict.fromkeys(ABLATIONS, [0])},
        "cxr-ieee8023": {"central": None, "fed-iid": [0], "local-iid": [0]},
    },
}
QUICK = {
    **FULL,
    "seeds": [0],
    "bridge_epochs": 2,
    "target_epochs": 1,
    "rounds": 1,
    "bootstrap": 200,
    "modalities": {
        "cxr": dict.fromkeys(["central", "no-augment", "fed-iid", "fed-skew", "local-iid"]),
        "oct": {"central": None},
    },
}

# Part sizes. CXR: the sites together hold <= 102 patients (the paper's CXR target set);
# OCT: 50 patients per class (200). The test set is 20 % of patients, the bridge set the rest.
ACC: dict[str, Path] = {"dir": WORK / "acc-full"}
DATASETS = {
    "cxr": {"root": DATA / "cxr", "augment": "cxr", "target_patients": 100, "test": 0.2},
    "oct": {"root": DATA / "oct", "augment": "oct", "target_patients": 200, "test": 0.2},
    # ieee8023 only (source_dataset column): 191 patients, 150 of them COVID-19
    "cxr-ieee8023": {"root": None, "augment": "cxr", "target_patients": 66, "test": 0.25},
}


def ieee_only_folder() -> Path:
    """A class-folder copy of the ieee8023 CXR images (in the scratch folder, not the repo)."""
    out = WORK / "data" / "cxr-ieee8023"
    if (out / "MANIFEST.csv").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    with (DATA / "MANIFEST.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r["modality"] == "cxr" and r["source_dataset"].startswith("ieee8023"):
                src = DATA / r["path"]
                dst = tmp / r["label"] / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
                rows.append((f"{r['label']}/{src.name}", r["label"], r["patient_id"]))
    with (tmp / "MANIFEST.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "label", "patient_id"))
        w.writerows(rows)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def count_patients(root: Path) -> int:
    from fedbridge_shared.data.samples import scan_folder

    return len({s.patient_id for s in scan_folder(root).samples})


def make_split(name: str, seed: int, skew: float | None) -> Path:
    """`fedbridge data split` (the function it calls), cached per modality/seed/skew."""
    from fedbridge_shared.data.split import split_folder

    ds = DATASETS[name]
    root = ds["root"] or ieee_only_folder()
    out = ACC["dir"] / name / f"seed{seed}" / ("split-skew" if skew else "split-iid")
    if (out / "split.csv").exists():
        return out
    total = count_patients(root)
    target = ds["target_patients"] / total
    bridge = 1.0 - ds["test"] - target
    shutil.rmtree(out, ignore_errors=True)
    split_folder(root, out, 3, bridge, ds["test"], seed, skew=skew)
    return out


def pooled(split: Path) -> Path:
    """The three sites' images in one class-folder tree with a MANIFEST.csv (central target)."""
    out = split / "target-pooled"
    if (out / "MANIFEST.csv").exists():
        return out
    rows = []
    with (split / "split.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r["part"].startswith("site-"):
                src = split / r["path"]
                dst = out / r["label"] / f"{r['part']}_{src.name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)
                rows.append((f"{r['label']}/{dst.name}", r["label"], r["patient_id"]))
    with (out / "MANIFEST.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "label", "patient_id"))
        w.writerows(rows)
    return out


def part_counts(split: Path) -> dict[str, dict[str, Any]]:
    counts: dict[str, dict[str, Any]] = {}
    with (split / "split.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            c = counts.setdefault(r["part"], {"images": 0, "patients": set(), "labels": {}})
            c["images"] += 1
            c["patients"].add(r["patient_id"])
            c["labels"][r["label"]] = c["labels"].get(r["label"], 0) + 1
    for c in counts.values():
        c["patients"] = len(c["patients"])
    return counts


def stage(kind: str, data: Path, out: Path, init: str, cfg: dict, aug: int, preset: str, seed: int,
          epochs: int) -> tuple[Path, float]:  # fmt: skip
    """`fedbridge bridge|train` through run_stage; a finished bundle is reused."""
    from rich.console import Console

    from fedbridge_shared.spec import is_bundle
    from fedbridge_shared.training import TrainConfig, run_stage

    if is_bundle(out):
        return out, 0.0
    t0 = time.perf_counter()
    config = TrainConfig(
        epochs=epochs,
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        augment_per_sample=aug,
        preset=preset,
        online_augment=preset != "none",
        seed=seed,
    )
    run_stage(
        kind, data, out=out, init=init, config=config, arch=cfg["arch"],
        image_size=cfg["image_size"], console=Console(stderr=True, quiet=True),
    )  # fmt: skip
    return out, time.perf_counter() - t0


def federate(sites: list[Path], init: Path, out: Path, cfg: dict, preset: str, seed: int,
             aug: int, extra: list[str] = ()) -> tuple[Path, float, dict]:  # fmt: skip
    """`fedbridge federate simulate` as a subprocess (Flower simulation, 3 SuperNodes)."""
    from fedbridge_shared.spec import is_bundle, load_bundle

    audit = out.with_name(out.name + "-audit")
    t0 = time.perf_counter()
    if not is_bundle(out):
        shutil.rmtree(audit, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + "-rounds"), ignore_errors=True)
        cmd = [
            str(Path(sys.executable).with_name("fedbridge")), "federate", "simulate",
            "--init", str(init), "--out", str(out),
            "--rounds", str(cfg["rounds"]), "--local-epochs", str(cfg["local_epochs"]),
            "--augment-per-sample", str(aug), "--augment", preset,
            "--lr", str(cfg["lr"]), "--batch-size", str(cfg["batch_size"]),
            "--seed", str(seed), "--audit-dir", str(audit),
        ]  # fmt: skip
        for s in sites:
            cmd += ["--site", str(s)]
        cmd += list(extra)  # more options, e.g. --strategy, --set key=value
        logf = out.with_name(out.name + ".log")
        with logf.open("w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if rc != 0 or not is_bundle(out):
            tail = logf.read_text()[-1500:]
            raise RuntimeError(f"federate simulate failed (rc {rc}): …{tail}")
    seconds = time.perf_counter() - t0
    bundle = load_bundle(out)
    return out, seconds, round_costs(bundle.training.get("history", []), audit)


def round_costs(history: list[dict], audit: Path) -> dict[str, Any]:
    """Per round: server wall time vs the slowest site's local training (from the audit)."""
    import json

    train_s: dict[int, list[float]] = {}
    sent_bytes: dict[int, list[int]] = {}
    for f in sorted(audit.glob("node-*.jsonl")):
        n_train = 0
        for line in f.read_text().splitlines():
            e = json.loads(line)
            if "train" not in str(e.get("type")) or "error" in e:
                continue
            n_train += 1
            metrics = e["records"].get("metrics", {}).get("items", {})
            train_s.setdefault(n_train, []).append(float(metrics.get("seconds", 0.0)))
            arrays = e["records"].get("arrays", {}).get("items", {})
            nbytes = sum(_nbytes(a) for a in arrays.values())
            sent_bytes.setdefault(n_train, []).append(nbytes)
    rows = []
    for h in history:
        r = int(h["round"])
        slow = max(train_s.get(r, [0.0]) or [0.0])
        rows.append(
            {
                "round": r,
                "round_s": h.get("seconds"),
                "slowest_site_train_s": slow,
                "site_train_s": train_s.get(r, []),
                "bytes_per_site": sent_bytes.get(r, []),
            }
        )
    return {"rounds": rows}


def _nbytes(a: dict) -> int:
    import numpy as np

    n = 1
    for d in a["shape"]:
        n *= int(d)
    return n * np.dtype(a["dtype"].replace("torch.", "")).itemsize


def assess(bundle: Path, test: Path, n_bootstrap: int, tta: bool = False) -> dict[str, Any]:
    """`fedbridge evaluate` (the one assessment) plus per-source accuracy from the file names."""
    from rich.console import Console

    from fedbridge_shared.assessment import assess as assess_bundle

    result = assess_bundle(
        bundle, test, n_bootstrap=n_bootstrap, tta=tta, console=Console(stderr=True, quiet=True)
    )
    metrics, y, probs = result.metrics, result.y, result.probs
    keep = ("n", "accuracy", "macro_auc", "sensitivity_mean", "f1_mean", "ci95", "per_class",
            "confusion_matrix", "labels")  # fmt: skip
    out = {k: metrics[k] for k in keep if k in metrics}
    samples = result.scored_samples  # the order of y and probs: no second scan
    pred = probs.argmax(1)
    by_source: dict[str, list[int]] = {}
    for s, yy, pp in zip(samples, y, pred, strict=True):
        src = s.path.name.split("_", 1)[0]
        by_source.setdefault(src, []).append(int(yy == pp))
    out["accuracy_by_source"] = {k: {"n": len(v), "accuracy": sum(v) / len(v)}
                                 for k, v in by_source.items()}  # fmt: skip
    return out


def run_modality(name: str, arms_seeds: dict, seed: int, cfg: dict, res: Results) -> None:
    ds = DATASETS[name]
    preset, n_aug = ds["augment"], cfg["augment_per_sample"]
    arms = [a for a, seeds in arms_seeds.items() if seeds is None or seed in seeds]
    if not arms:
        return
    if True:  # one seed per call (keeps the arm loop's indentation)
        base = ACC["dir"] / name / f"seed{seed}"
        iid = make_split(name, seed, None)
        skew = make_split(name, seed, cfg["skew_alpha"]) if any("skew" in a for a in arms) else None
        counts = res.setdefault("splits", {})
        counts[f"{name}/seed{seed}/iid"] = part_counts(iid)
        if skew:
            counts[f"{name}/seed{seed}/skew"] = part_counts(skew)
        test, pool = iid / "test", pooled(iid)
        sites = {"iid": [iid / f"site-{i}" for i in (1, 2, 3)]}
        if skew:
            sites["skew"] = [skew / f"site-{i}" for i in (1, 2, 3)]
        cache: dict[str, tuple[Path, float]] = {}

        def bridge(init: str, cache=cache, seed=seed, iid=iid, base=base) -> tuple[Path, float]:
            if init not in cache:
                log(f"{name} seed {seed}: bridge stage from {init}")
                cache[init] = stage(
                    "bridge", iid / "bridge", base / f"bridge-{init}", init, cfg, 0, preset, seed,
                    cfg["bridge_epochs"],
                )  # fmt: skip
            return cache[init]

        for arm in arms:
            done = {(r["modality"], r["seed"], r["arm"]) for r in res.setdefault("runs", [])}
            if (name, seed, arm) in done:
                continue
            log(f"{name} seed {seed}: arm {arm}")
            t0 = time.perf_counter()
            row: dict[str, Any] = {"modality": name, "seed": seed, "arm": arm}
            try:
                ep = cfg["target_epochs"]
                if arm in ("central", "no-imagenet", "no-augment"):
                    b, bs = bridge("none" if arm == "no-imagenet" else "imagenet")
                    aug, pre = (0, "none") if arm == "no-augment" else (n_aug, preset)
                    m, ts = stage("train", pool, base / arm, str(b), cfg, aug, pre, seed, ep)
                    row.update(bridge_s=bs, target_s=ts, metrics=assess(m, test, cfg["bootstrap"]))
                elif arm == "no-bridge":
                    m, ts = stage("train", pool, base / arm, "imagenet", cfg, n_aug, preset, seed,
                                  ep)  # fmt: skip
                    row.update(target_s=ts, metrics=assess(m, test, cfg["bootstrap"]))
                elif arm.startswith("fed-"):
                    b, bs = bridge("imagenet")
                    m, fs, cost = federate(sites[arm[4:]], b, base / arm, cfg, preset, seed, n_aug)
                    row.update(bridge_s=bs, federate_s=fs, cost=cost,
                               metrics=assess(m, test, cfg["bootstrap"]))  # fmt: skip
                elif arm.startswith("local-"):
                    b, bs = bridge("imagenet")
                    per_site = []
                    for i, site in enumerate(sites[arm[6:]], start=1):
                        m, ts = stage("train", site, base / f"{arm}-site{i}", str(b), cfg, n_aug,
                                      preset, seed, ep)  # fmt: skip
                        per_site.append({"site": i, "target_s": ts,
                                         **assess(m, test, cfg["bootstrap"])})  # fmt: skip
                    row.update(bridge_s=bs, per_site=per_site, metrics=_mean_sites(per_site))
                else:
                    raise ValueError(f"unknown arm {arm}")
            except Exception as e:  # noqa: BLE001 - one failed arm is recorded, the rest go on
                row["error"] = f"{type(e).__name__}: {e}"[-2000:]
                log(f"  FAILED: {row['error'][:300]}")
            row["seconds"] = round(time.perf_counter() - t0, 1)
            if "metrics" in row:
                m = row["metrics"]
                log(f"  accuracy {m['accuracy']:.3f}  macro AUC {m.get('macro_auc') or 0:.3f}"
                    f"  ({row['seconds']:.0f}s)")  # fmt: skip
            res["runs"] = [*res["runs"], row]


def _mean_sites(per_site: list[dict]) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {"n": per_site[0]["n"], "aggregate": "mean of the site models"}
    for k in ("accuracy", "macro_auc", "sensitivity_mean", "f1_mean"):
        vals = [s[k] for s in per_site if s.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
        out[f"{k}_sites"] = vals
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, fewer arms and epochs")
    p.add_argument("--only", default="", help="comma-separated modalities to run")
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    cfg = QUICK if args.quick else FULL
    settings = {**cfg, "datasets": {k: {kk: str(vv) for kk, vv in v.items()}
                                    for k, v in DATASETS.items()}, "paper": PAPER}  # fmt: skip
    ACC["dir"] = WORK / f"acc-{mode}"
    res = Results("accuracy", mode, settings)
    res["runs"] = []
    WORK.mkdir(parents=True, exist_ok=True)
    only = [m for m in args.only.split(",") if m]
    for seed in cfg["seeds"]:
        for name, arms in cfg["modalities"].items():
            if only and name not in only:
                continue
            run_modality(name, arms, seed, cfg, res)
    res.done()
    log(f"accuracy ({mode}) done in {res['wall_s']:.0f}s → {res.path}")


if __name__ == "__main__":
    main()
