"""The default recipe at the product's default model, with the large bridge sets (issue #16).

MobileNetV2 @ 224 (``../shared/weights``), everything through the product's own functions
(split_folder, run_stage, evaluate_bundle) and CLI (``fedbridge federate simulate``):

1. **Bridges.** A split's own bridge part (patients left over after the sites and the test set)
   is cut by patient into a validation quarter and the rest (``small``). CXR: ``large`` is the
   public Kermany set (``../shared/data/bridge``, 3,000 images, 3 classes, disjoint by patient;
   trained once, every seed reuses it), ``union`` is Kermany plus ``small`` (4 classes). OCT:
   ``small`` alone or ``union`` with the partial Kermany OCT set (CNV, NORMAL). A 4-class target
   carries the classifier rows of the labels its bridge has, by name; the others start fresh.
2. **Recipe ablation on validation patients only** (seed 0's validation quarter: disjoint from
   the sites and from the test patients). First the bridge, with the base recipe; then each
   component alone on top of the base recipe; the components that beat the base by at least
   ``min_gain`` on validation are combined, and the combination is kept only if it is at least
   as good as the best single component on validation. The test split is not read until the
   recipe is fixed.
3. **Headline arms on the test patients** with that recipe: 3-stage central, FedAvg over 3 IID
   sites, FedAvg over 3 label-skewed sites (Dirichlet α = 0.5), local-only on each site, and the
   ablations (no ImageNet, no bridge, small bridge, no augmentation), in the order of
   ``schedule`` (a cut-short run has seed 0 of both modalities first). CPU time (user +
   system, this process and its children) is recorded for every arm; for a federated arm it
   misses the Ray worker processes that run the sites (not this process's children).

Results: ``bench/results/recipe-<mode>.json``, rewritten after every arm.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from bench import accuracy
from bench._common import DATA, WORK, Results, log

BRIDGE = DATA / "bridge"
MAIN = ["central", "fed-iid", "fed-skew", "local-iid", "local-skew"]
ABLATIONS = ["no-imagenet", "no-bridge", "small-bridge", "no-augment"]
# rounds × local epochs at the same budget of 2 site epochs, scored on validation patients
SCHEDULES = ["val-fed-iid-r2e1", "val-fed-iid-r1e2", "val-fed-skew-r2e1", "val-fed-skew-r1e2"]
CANDIDATES: dict[str, dict[str, Any]] = {
    # name -> (TrainConfig overrides, evaluate with TTA)
    "base": {},
    "label-smoothing": {"label_smoothing": 0.1},
    "ema": {"ema_decay": 0.99},
    "balanced": {"balanced": True},
    "lr-1e-3": {"lr": 1e-3},
    "clahe": {"intensity": "clahe"},
    "tta": {"tta": True},
    # measured after the recipe was fixed (``late``): reported beside the others, not chosen
    "discriminative-lr": {"backbone_lr_scale": 0.1},
    "input-288": {"image_size": 288},  # the target stage at 288 px from the 224-px bridge
    # base and chosen again on the bridge the late candidates had (a resumed run may retrain it)
    "late-base": {},
    "late-ema": {"ema_decay": 0.99},
    "ema+discriminative-lr": {"ema_decay": 0.99, "backbone_lr_scale": 0.1},
}
LATE = ["discriminative-lr", "input-288", "late-base", "late-ema", "ema+discriminative-lr"]
FULL: dict[str, Any] = {
    "arch": "mobilenetv2_100",
    "image_size": 224,
    "bridge_epochs": 3,
    "target_epochs": 2,
    "augment_per_sample": 10,
    "rounds": 2,
    "local_epochs": 1,
    "batch_size": 16,
    "lr": 5e-4,
    "skew_alpha": 0.5,
    "bootstrap": 1000,
    "min_gain": 0.01,
    "modalities": {
        "cxr": {
            "bridges": ["large", "union"],
            "candidates": [c for c in CANDIDATES if c not in LATE],
            "late": LATE,
        },
        "oct": {
            "bridges": ["small", "union"],
            "candidates": ["base"],
        },
    },
    # (modality, seeds, arms) in the order they run: whatever a cut-short run finished is a
    # complete first seed of both modalities, then more seeds, then the ablations
    "schedule": [
        ("cxr", [0], MAIN),
        ("oct", [0], MAIN),
        ("cxr", [0], ["fed-skew-fedprox", "fed-skew-fedavgm"]),
        ("cxr", [1, 2], MAIN),
        ("oct", [1, 2], MAIN),
        ("cxr", [0], SCHEDULES),
        ("cxr", [0], ABLATIONS),
        ("oct", [0], ABLATIONS),
    ],
}
QUICK: dict[str, Any] = {
    **FULL,
    "bridge_epochs": 1,
    "target_epochs": 1,
    "rounds": 1,
    "bootstrap": 200,
    "modalities": {
        "cxr": {
            "bridges": ["large"],
            "candidates": ["base", "tta"],
        },
    },
    "schedule": [("cxr", [0], ["central", "fed-iid"])],
}
STRATEGY_SET = {  # extra federated arms: `--set` for another server strategy
    "fedprox": ["--strategy", "fedprox", "--set", "proximal-mu=0.01"],
    "fedavgm": [
        "--strategy",
        "fedavgm",
        "--set",
        "fedavgm.server-lr=1.0",
        "--set",
        "fedavgm.momentum=0.9",
    ],
}
TRAIN_KEYS = ("label_smoothing", "ema_decay", "balanced", "lr", "intensity", "backbone_lr_scale")
# What federated arms pass to the sites (`--set`). Not the EMA: it was validated on central
# stages (≈ 140 steps); a site's round is ≈ 25 steps, far shorter than a 0.99 EMA's horizon.
SET_KEYS = {"label_smoothing": "label-smoothing", "balanced": "balanced", "intensity": "intensity"}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine (``/proc/stat``): the Ray workers of a federated
    arm included, and anything else that runs meanwhile (the benchmark should run alone)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def link_tree(parts: list[tuple[Path, str]], out: Path, manifests: list[Path]) -> Path:
    """Hard-link the class folders of ``parts`` (folder, file prefix) into one tree with a
    MANIFEST.csv whose patient ids come from ``manifests`` (by file name), cached."""
    if (out / "MANIFEST.csv").exists():
        return out
    ids: dict[str, str] = {}
    for m in manifests:
        with m.open(newline="") as fh:
            for r in csv.DictReader(fh):
                ids[Path(r["path"]).name] = r["patient_id"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for folder, prefix in parts:
        for img in sorted(folder.glob("*/*")):
            if not img.is_file() or img.name not in ids:
                continue
            dst = tmp / img.parent.name / f"{prefix}{img.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(img, dst)
            except OSError:  # another file system
                shutil.copy2(img, dst)
            rows.append((f"{img.parent.name}/{dst.name}", img.parent.name, ids[img.name]))
    with (tmp / "MANIFEST.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "label", "patient_id"))
        w.writerows(rows)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def split_by_patient(folder: Path, out: Path, fraction: float, seed: int) -> tuple[Path, Path]:
    """``folder``'s patients into (rest, held-out ``fraction``), cached: the OCT validation set."""
    import random

    rest, held = out / "bridge-rest", out / "val"
    if (held / "MANIFEST.csv").exists():
        return rest, held
    with (folder.parent / "split.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["part"] == folder.name]
    patients = sorted({r["patient_id"] for r in rows})
    random.Random(seed).shuffle(patients)
    chosen = set(patients[: max(1, round(fraction * len(patients)))])
    manifest = folder.parent / "split.csv"
    for target, keep in ((rest, False), (held, True)):
        sub = out / f".pick-{target.name}"
        shutil.rmtree(sub, ignore_errors=True)
        for r in rows:
            if (r["patient_id"] in chosen) == keep:
                src = folder.parent / r["path"]
                dst = sub / src.parent.name / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)
        link_tree([(sub, "")], target, [manifest])
        shutil.rmtree(sub)
    return rest, held


def train(kind: str, data: Path, out: Path, init: str, cfg: dict, *, aug: int, preset: str,
          seed: int, epochs: int, recipe: dict[str, Any]) -> float:  # fmt: skip
    """`fedbridge bridge|train` (run_stage) with the recipe's overrides; cached; CPU seconds."""
    from rich.console import Console

    from fedbridge_shared import defaults
    from fedbridge_shared.spec import is_bundle
    from fedbridge_shared.training import TrainConfig, run_stage

    if is_bundle(out):
        return 0.0
    c0 = cpu_seconds()
    # the base recipe has no component: no EMA unless the recipe says so (TrainConfig's default
    # is the chosen recipe's EMA); a bridge has `fedbridge bridge`'s default (off)
    recipe = {"ema_decay": defaults.BRIDGE_EMA_DECAY if kind == "bridge" else 0.0, **recipe}
    config = TrainConfig(
        epochs=epochs,
        batch_size=cfg["batch_size"],
        lr=recipe.get("lr", cfg["lr"]),
        augment_per_sample=aug,
        preset=preset,
        online_augment=preset != "none",
        seed=seed,
        **{k: v for k, v in recipe.items() if k in TRAIN_KEYS and k != "lr"},
    )
    run_stage(
        kind, data, out=out, init=init, config=config, arch=cfg["arch"],
        image_size=recipe.get("image_size", cfg["image_size"]),
        console=Console(stderr=True, quiet=True),
    )  # fmt: skip
    return cpu_seconds() - c0


def assess(bundle: Path, data: Path, cfg: dict, recipe: dict[str, Any]) -> dict[str, Any]:
    """evaluate_bundle (with TTA when the recipe says so) plus accuracy per image source."""
    return accuracy.assess(bundle, data, cfg["bootstrap"], tta=bool(recipe.get("tta")))


def choose(scores: dict[str, float], min_gain: float) -> tuple[list[str], str]:
    """The components that beat ``base`` by ``min_gain`` (validation accuracy), and why."""
    base = scores["base"]
    good = sorted((k for k, v in scores.items() if k != "base" and v >= base + min_gain),
                  key=lambda k: -scores[k])  # fmt: skip
    return good, (
        f"base {base:.3f}; kept (≥ base + {min_gain:g}): "
        + (", ".join(f"{k} {scores[k]:.3f}" for k in good) or "none")
    )


def parsimonious(options: list[list[str]], rows: dict[str, dict]) -> list[str]:
    """The option (a list of components) with the best validation accuracy; ties go to fewer
    components, then to the higher validation macro AUC. No option: the base recipe ([])."""
    if not options:
        return []

    def row(option: list[str]) -> dict:
        return rows[option[0]] if len(option) == 1 else rows["combined"]

    return max(options, key=lambda o: (row(o)["accuracy"], -len(o), row(o).get("macro_auc") or 0))


def parse_schedule(arm: str) -> tuple[str, int, int]:
    """``val-fed-skew-r1e2`` → ("skew", 1 round, 2 local epochs)."""
    import re

    m = re.fullmatch(r"val-fed-(iid|skew)-r(\d+)e(\d+)", arm)
    if m is None:
        raise ValueError(f"{arm}: not val-fed-<iid|skew>-r<rounds>e<local epochs>")
    return m[1], int(m[2]), int(m[3])


def merge(names: list[str]) -> dict[str, Any]:
    recipe: dict[str, Any] = {}
    for n in names:
        recipe.update(CANDIDATES[n])
    return recipe


def run_modality(
    name: str, plan: dict, seed: int, cfg: dict, res: Results, arms: list[str]
) -> None:
    ds = accuracy.DATASETS[name]
    preset, n_aug, ep = ds["augment"], cfg["augment_per_sample"], cfg["target_epochs"]
    base = accuracy.ACC["dir"] / name
    seed_dir = base / f"seed{seed}"
    iid = accuracy.make_split(name, seed, None)
    skewed = any("skew" in a for a in arms)
    skew = accuracy.make_split(name, seed, cfg["skew_alpha"]) if skewed else None
    counts = res.setdefault("splits", {})
    counts[f"{name}/seed{seed}/iid"] = accuracy.part_counts(iid)
    if skew:
        counts[f"{name}/seed{seed}/skew"] = accuracy.part_counts(skew)
    bridges = res.setdefault("bridges", {})
    recipes = res.setdefault("recipes", {})

    def bridge(init: str, which: str, seed: int = seed) -> Path:
        """The bridge bundle ``which`` from ``init``: the large CXR set is disjoint from every
        split, so it is trained once; a bridge made of a split's own part belongs to that seed."""
        from fedbridge_shared.spec import is_bundle

        bseed = 0 if which == "large" else seed
        key = f"{name}/{which}/{init}/seed{bseed}"
        out = base / f"bridge-{which}-{init}-seed{bseed}"
        known = key in bridges and "error" not in bridges[key]
        if not known or not is_bundle(out):  # a resumed run on a fresh machine retrains it
            log(f"{name}: bridge {which} from {init} (seed {bseed})")
            data = bridge_data(which, bseed)
            c0, t0 = cpu_seconds(), time.perf_counter()
            train("bridge", data, out, init, cfg, aug=0, preset=preset, seed=0,
                  epochs=cfg["bridge_epochs"], recipe={})  # fmt: skip
            cost = {"cpu_s": round(cpu_seconds() - c0, 1),
                    "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
            if known:  # same data, same seed: the first training's cost stands
                bridges[key]["retrained"] = cost
            else:
                bridges[key] = {"data": str(data), **cost,
                                "images": sum(1 for _ in data.glob("*/*"))}  # fmt: skip
            res["bridges"] = bridges
        return out

    def bridge_data(which: str, bseed: int) -> Path:
        """``small``: the split's own bridge part less its validation patients; ``large``: the
        public bridge set (CXR); ``union``: both in one tree."""
        split = accuracy.make_split(name, bseed, None)
        rest, _ = split_by_patient(split / "bridge", base / f"seed{bseed}-val", 0.25, bseed)
        if which == "small":
            return rest
        if which == "large":
            return BRIDGE / name
        return link_tree([(rest, ""), (BRIDGE / name, "kermany-bridge_")],
                         base / f"bridge-union-seed{bseed}",
                         [split / "split.csv", BRIDGE / "MANIFEST.csv"])  # fmt: skip

    def validation() -> Path:
        split0 = accuracy.make_split(name, 0, None)
        return split_by_patient(split0 / "bridge", base / "seed0-val", 0.25, 0)[1]

    # -- 2. the recipe, on validation patients (seed 0's split), once per modality
    if (recipes.get(name) or {}).get("final") is None:
        val = validation()
        pool0 = accuracy.pooled(accuracy.make_split(name, 0, None))
        rows: dict[str, Any] = {}
        choices = plan["bridges"]
        which = choices[0]
        if len(choices) > 1:  # which bridge, with the base recipe
            for w in choices:
                b = bridge("imagenet", w, 0)
                out = base / f"val-{w}-base"  # the base row reuses it
                cpu = train("train", pool0, out, str(b), cfg, aug=n_aug, preset=preset, seed=0,
                            epochs=ep, recipe={})  # fmt: skip
                rows[f"bridge-{w}"] = {"cpu_s": round(cpu, 1), **assess(out, val, cfg, {})}
                log(f"{name} val: bridge {w}: {rows[f'bridge-{w}']['accuracy']:.3f}")
            which = max(choices, key=lambda w: rows[f"bridge-{w}"]["accuracy"])
        b = bridge("imagenet", which, 0)
        scores = {}
        for cand in plan["candidates"]:
            recipe = CANDIDATES[cand]
            trained = cand if any(k in TRAIN_KEYS for k in recipe) else "base"
            out = base / f"val-{which}-{trained}"
            cpu = train("train", pool0, out, str(b), cfg, aug=n_aug, preset=preset, seed=0,
                        epochs=ep, recipe=recipe)  # fmt: skip
            rows[cand] = {"cpu_s": round(cpu, 1), **assess(out, val, cfg, recipe)}
            scores[cand] = rows[cand]["accuracy"]
            auc = rows[cand].get("macro_auc") or 0
            log(f"{name} val: {cand}: {scores[cand]:.3f}  AUC {auc:.3f}")
            recipes[name] = {"bridge": which, "validation": str(val), "rows": rows, "final": None}
            res["recipes"] = recipes
        good, why = choose(scores, cfg["min_gain"])
        options = [[g] for g in good]
        if len(good) > 1:  # the combination must earn its place on validation too
            out = base / f"val-{which}-combined"
            combo = merge(good)
            cpu = train("train", pool0, out, str(b), cfg, aug=n_aug, preset=preset, seed=0,
                        epochs=ep, recipe=combo)  # fmt: skip
            rows["combined"] = {"cpu_s": round(cpu, 1), "components": good,
                                **assess(out, val, cfg, combo)}  # fmt: skip
            options.append(good)
            why += f"; combined {rows['combined']['accuracy']:.3f}"
        chosen = parsimonious(options, rows)
        why += (
            "; among the kept ones and their combination: the best validation accuracy, on a "
            "tie the fewest components, then the best validation macro AUC"
        )
        recipes[name] = {"bridge": which, "validation": str(val), "rows": rows,
                         "final": chosen, "why": why}  # fmt: skip
        res["recipes"] = recipes
        log(f"{name} recipe: {chosen or ['base']} ({why})")

    rec = recipes[name]
    for cand in plan.get("late", []):  # measured after the choice: reported, never chosen
        if cand in rec["rows"]:
            continue
        b = bridge("imagenet", rec["bridge"], 0)
        out = base / f"val-{rec['bridge']}-{cand}"
        cpu = train("train", accuracy.pooled(accuracy.make_split(name, 0, None)), out, str(b),
                    cfg, aug=n_aug, preset=preset, seed=0, epochs=ep,
                    recipe=CANDIDATES[cand])  # fmt: skip
        rec["rows"][cand] = {"cpu_s": round(cpu, 1), "late": True,
                             **assess(out, validation(), cfg, CANDIDATES[cand])}  # fmt: skip
        res["recipes"] = recipes
        log(f"{name} val (late): {cand}: {rec['rows'][cand]['accuracy']:.3f}")
    recipe = merge(rec["final"])
    which = rec["bridge"]
    fed_set = [x for k, v in recipe.items() if k in SET_KEYS
               for x in ("--set", f"{SET_KEYS[k]}={str(v).lower()}")]  # fmt: skip
    fed_cfg = {**cfg, "lr": recipe.get("lr", cfg["lr"])}
    test, pool = iid / "test", accuracy.pooled(iid)
    sites = {"iid": [iid / f"site-{i}" for i in (1, 2, 3)]}
    if skew:
        sites["skew"] = [skew / f"site-{i}" for i in (1, 2, 3)]

    # -- 3. the headline arms, on the test patients
    for arm in arms:
        done = {(r["modality"], r["seed"], r["arm"]) for r in res.setdefault("runs", [])}
        if (name, seed, arm) in done:
            continue
        log(f"{name} seed {seed}: arm {arm}")
        t0, c0, m0 = time.perf_counter(), cpu_seconds(), machine_cpu_seconds()
        row: dict[str, Any] = {"modality": name, "seed": seed, "arm": arm}
        try:
            if arm in ("central", "no-imagenet", "small-bridge", "no-augment", "no-bridge"):
                if arm == "no-bridge":
                    init = "imagenet"
                else:
                    init = str(bridge("none" if arm == "no-imagenet" else "imagenet",
                                      "small" if arm == "small-bridge" else which))  # fmt: skip
                aug, pre = (0, "none") if arm == "no-augment" else (n_aug, preset)
                out = seed_dir / arm
                row["target_cpu_s"] = round(train("train", pool, out, init, cfg, aug=aug,
                                                  preset=pre, seed=seed, epochs=ep,
                                                  recipe=recipe), 1)  # fmt: skip
                row["metrics"] = assess(out, test, cfg, recipe)
            elif arm.startswith("val-fed-"):  # val-fed-skew-r1e2: 1 round × 2 local epochs
                kind, r, e = parse_schedule(arm)
                b = bridge("imagenet", which)
                m, fs, cost = accuracy.federate(
                    sites[kind], b, seed_dir / arm, {**fed_cfg, "rounds": r, "local_epochs": e},
                    preset, seed, n_aug, extra=fed_set,
                )  # fmt: skip
                row.update(federate_s=fs, cost=cost, rounds=r, local_epochs=e,
                           scored_on="validation")  # fmt: skip
                row["metrics"] = assess(m, validation(), cfg, recipe)
            elif arm.startswith("fed-"):
                b = bridge("imagenet", which)
                out = seed_dir / arm
                kind, _, strategy = arm[4:].partition("-")  # fed-skew-fedprox: --strategy
                extra = [*fed_set, *STRATEGY_SET.get(strategy, [])]
                m, fs, cost = accuracy.federate(sites[kind], b, out, fed_cfg, preset, seed,
                                                n_aug, extra=extra)  # fmt: skip
                row.update(federate_s=fs, cost=cost, metrics=assess(m, test, cfg, recipe))
            elif arm.startswith("local-"):
                b = bridge("imagenet", which)
                per_site = []
                for i, site in enumerate(sites[arm[6:]], start=1):
                    out = seed_dir / f"{arm}-site{i}"
                    cpu = train("train", site, out, str(b), cfg, aug=n_aug, preset=preset,
                                seed=seed, epochs=ep, recipe=recipe)  # fmt: skip
                    per_site.append({"site": i, "target_cpu_s": round(cpu, 1),
                                     **assess(out, test, cfg, recipe)})  # fmt: skip
                row.update(per_site=per_site, metrics=accuracy._mean_sites(per_site))
                row["metrics"]["best_site_accuracy"] = max(s["accuracy"] for s in per_site)
            else:
                raise ValueError(f"unknown arm {arm}")
        except Exception as e:  # noqa: BLE001 - one failed arm is recorded, the rest go on
            row["error"] = f"{type(e).__name__}: {e}"[-2000:]
            log(f"  FAILED: {row['error'][:300]}")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["cpu_s"] = round(cpu_seconds() - c0, 1)
        row["machine_cpu_s"] = round(machine_cpu_seconds() - m0, 1)
        if "metrics" in row:
            m = row["metrics"]
            log(f"  accuracy {m['accuracy']:.3f}  macro AUC {m.get('macro_auc') or 0:.3f}"
                f"  ({row['seconds']:.0f}s, {row['cpu_s']:.0f} CPU-s)")  # fmt: skip
        res["runs"] = [*res["runs"], row]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 2 candidates, 2 arms, 1 epoch")
    p.add_argument("--only", default="", help="comma-separated modalities to run")
    p.add_argument("--resume", action="store_true", help="keep the finished arms of the JSON")
    args = p.parse_args()
    mode = "quick" if args.quick else "full"
    cfg = QUICK if args.quick else FULL
    accuracy.ACC["dir"] = WORK / f"recipe-{mode}"
    datasets = {k: {kk: str(vv) for kk, vv in v.items()}
                for k, v in accuracy.DATASETS.items() if k in cfg["modalities"]}  # fmt: skip
    settings = {**cfg, "candidates": CANDIDATES, "paper": accuracy.PAPER, "datasets": datasets}
    old = Results.load("recipe", mode) if args.resume else None
    res = Results("recipe", mode, settings)
    for key in ("runs", "recipes", "bridges", "splits", "notes"):
        res[key] = (old or {}).get(key, [] if key in ("runs", "notes") else {})
    res["launches"] = [*(old.get("launches", [old["started"]]) if old else []), res["started"]]
    only = [m for m in args.only.split(",") if m]
    for name, seeds, arms in cfg["schedule"]:
        for seed in seeds:
            if not only or name in only:
                run_modality(name, cfg["modalities"][name], seed, cfg, res, arms)
    res.done()
    log(f"recipe ({mode}) done in {res['wall_s']:.0f}s → {res.path}")


if __name__ == "__main__":
    main()
