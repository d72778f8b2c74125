"""Issue #29's study, summarised: `bench/shortcut_study.sh OUT` → tables with paired CIs.

Every film is predicted by each arm's exported bedside model (``fedbridge_edge.Predictor``, the
ONNX the study wrote), so base and adult arms are compared on the *same* films: paired
differences, bootstrapped over patients (films of one patient move together), averaged over
seeds. The recipe decision reads validation only (held-out NIH adult patients); test patients
and cxr-external are reported after it.

Usage: python -m bench.shortcut_study_report OUT [--json bench/results/shortcut-study.json]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedbridge_edge.cutoff import choose
from fedbridge_edge.preprocess import normalise, resize
from fedbridge_edge.runtime import Predictor
from fedbridge_shared.data.images import read_image

POSITIVE = "COVID19"
SETS = {"PNEUMONIA_UNSPECIFIED": {"BACTERIAL_PNEUMONIA", "VIRAL_PNEUMONIA"}}
B = 2000


def _patients(folder: Path) -> dict[str, str]:
    """File name → patient id, from the folder's own or parent's manifest (split.csv/MANIFEST)."""
    for manifest in (folder / "MANIFEST.csv", folder.parent / "split.csv", folder / "split.csv"):
        if manifest.is_file():
            with manifest.open(newline="") as fh:
                return {Path(r["path"]).name: r["patient_id"] for r in csv.DictReader(fh)}
    raise SystemExit(f"{folder}: no manifest with patient ids")


def films(folder: Path) -> list[tuple[Path, str, str]]:
    """(path, true label, patient) for every image of a class-folder tree, sorted."""
    pid = _patients(folder)
    return [
        (f, d.name, pid.get(f.name, f.name))
        for d in sorted(p for p in folder.iterdir() if p.is_dir())
        for f in sorted(d.iterdir())
        if f.is_file()
    ]


def predict(
    onnx: Path, items: list[tuple[Path, str, str]]
) -> tuple[list[str], list[bool], np.ndarray, list[str], np.ndarray]:
    """Per film: the argmax label, whether the bedside refused it (out of distribution), the
    softmax probability of COVID19 (refused films are scored too), the most probable label
    other than COVID19 (the call when a cut-off says "not COVID19": ``called_at``), and
    P(COVID19) as the bedside shows it (softmax(logits / T), the export's temperature)."""
    model = Predictor(onnx, threads=2)
    labels, refused, probs, runner_up, shown = [], [], [], [], []
    k = model.labels.index(POSITIVE)
    for path, _, _ in items:
        grey = read_image(path)
        refused.append(model.predict_array(grey, str(path)).record.ood)
        logits = model.run(normalise(resize(grey, model.spec.image_size), model.spec)[None])
        z = logits["logits"][0].astype(np.float64)
        labels.append(model.labels[int(z.argmax())])
        p = np.exp(z - z.max())
        probs.append(float(p[k] / p.sum()))
        q = np.exp((z - z.max()) / (model.temperature or 1.0))
        shown.append(float(q[k] / q.sum()))
        p[k] = -1.0
        runner_up.append(model.labels[int(p.argmax())])
    return labels, refused, np.array(probs), runner_up, np.array(shown)


MAX_FALSE_COVID = 0.10  # the goal for adult non-COVID films called COVID19


def covid_threshold(p_covid_val: np.ndarray, rate: float = MAX_FALSE_COVID) -> float:
    """The lowest P(COVID19) cut-off at which at most ``rate`` of the *validation* adult
    non-COVID films (held-out NIH patients) would be called COVID19: the rule of the bedside's
    ``export onnx --cutoff COVID19=0.10 --cutoff-data …``."""
    return choose(p_covid_val, rate)


def called_at(labels: list[str], p_covid: np.ndarray, runner_up: list[str], t: float) -> list[str]:
    """The call with a COVID19 cut-off: COVID19 iff P(COVID19) ≥ t, else the argmax when it is
    not COVID19, else the most probable other label."""
    return [POSITIVE if p >= t else (x if x != POSITIVE else r)
            for x, p, r in zip(labels, p_covid, runner_up, strict=True)]  # fmt: skip


def covid_auc(items, p_covid: np.ndarray) -> float | None:
    """AUC of P(COVID19): COVID films vs every other film (threshold-free separation)."""
    from sklearn.metrics import roc_auc_score

    y = np.array([t == POSITIVE for _, t, _ in items])
    return float(roc_auc_score(y, p_covid)) if 0 < y.sum() < len(y) else None


def indicators(items, labels: list[str]) -> dict[str, np.ndarray]:
    """Per film, 0/1 for each measure (NaN where the measure does not apply to the film)."""
    truth = [t for _, t, _ in items]
    correct = [p in SETS.get(t, {t}) for t, p in zip(truth, labels, strict=True)]
    nan = float("nan")
    return {
        "accuracy": np.array(correct, float),
        "non_covid_called_covid": np.array(
            [
                float(p == POSITIVE) if t != POSITIVE else nan
                for t, p in zip(truth, labels, strict=True)
            ]
        ),
        "covid_recognised": np.array(
            [
                float(p == POSITIVE) if t == POSITIVE else nan
                for t, p in zip(truth, labels, strict=True)
            ]
        ),
    }


def paired(per_seed: list[tuple[list[str], np.ndarray, np.ndarray]], seed: int = 0) -> dict:
    """Mean over seeds of (arm b − arm a) with a patient-bootstrap 95 % CI.

    ``per_seed``: (patient per film, arm-a indicator, arm-b indicator); NaN = not applicable.
    """
    rng = np.random.default_rng(seed)
    groups = []
    for patients, a, b in per_seed:
        keep = ~np.isnan(a)
        pts = np.asarray(patients)[keep]
        uniq, inv = np.unique(pts, return_inverse=True)
        groups.append((len(uniq), inv, a[keep], b[keep]))
    point = float(np.mean([b.mean() - a.mean() for _, _, a, b in groups]))
    means_a = float(np.mean([a.mean() for _, _, a, _ in groups]))
    means_b = float(np.mean([b.mean() for _, _, _, b in groups]))
    boots = np.empty(B)
    for i in range(B):
        diffs = []
        for n, inv, a, b in groups:
            w = np.bincount(rng.integers(0, n, n), minlength=n)[inv]  # films of drawn patients
            diffs.append((w * (b - a)).sum() / max(w.sum(), 1))
        boots[i] = np.mean(diffs)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"a": means_a, "b": means_b, "diff": point, "ci95": [float(lo), float(hi)],
            "films": int(sum(len(a) for _, _, a, _ in groups)), "seeds": len(groups)}  # fmt: skip


FOLDERS = ("validation (NIH adult, held out)", "test patients", "cxr-external")


def federated(out: Path) -> dict:
    """The federated arms (`bench/shortcut_headline_fed.sh`, `bench/shortcut_fed_adult.sh`) from
    their `fedbridge evaluate --json` files: per setting, sites and arm, each seed's numbers."""
    rows: dict = defaultdict(lambda: defaultdict(list))
    for f in sorted(out.glob("s[0-9]*/*/fed-*/*-test.json")):
        setting, sites, arm = f.parts[-3], f.parts[-2].removeprefix("fed-"), f.stem[:-5]
        row = {"seed": int(f.parts[-4][1:])}
        m = json.loads(f.read_text())
        row |= {"test_accuracy": m["accuracy"], "test_macro_auc": m.get("macro_auc")}
        for folder in ("adultval", "external"):
            g = f.with_name(f"{arm}-{folder}.json")
            if g.is_file():
                ext = json.loads(g.read_text())["external"]
                fc = ext["non_COVID19_called_COVID19"]
                row[f"{folder}_false_covid"] = fc["k"] / fc["n"]
                if folder == "external":
                    sens = ext["COVID19_sensitivity"]
                    row["external_covid_recognised"] = sens["k"] / sens["n"]
                    row["external_accuracy"] = ext["accuracy"]["rate"]
        rows[setting][f"{arm}, {sites}"].append(row)
    return {k: dict(v) for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--json", type=Path, default=Path("bench/results/shortcut-study.json"))
    args = ap.parse_args()
    out: Path = args.out
    seeds = sorted(int(p.name[1:]) for p in out.glob("s[0-9]*") if p.is_dir())
    result: dict = {"out": str(out), "seeds": seeds, "settings": {}}
    external = films(args.data / "cxr-external")
    adultval = films(out / "adult" / "test")
    for setting in ("mixed", "paper"):
        arms = sorted({p.stem for p in out.glob(f"s*/{setting}/*.onnx")} - {"base"})
        block: dict = {"arms": {}}
        for arm in ["base", *arms]:
            per = defaultdict(list)  # (folder, measure) → per-seed (patients, base, arm)
            stats: dict = defaultdict(list)
            for s in seeds:
                root = out / f"s{s}" / setting
                if not all((root / f"{a}.onnx").is_file() for a in ("base", arm)):
                    continue
                test = films(root / "split" / "test")
                for name, items in zip(FOLDERS, (adultval, test, external), strict=True):
                    preds = {a: predict(root / f"{a}.onnx", items) for a in ("base", arm)}
                    ind = {a: indicators(items, preds[a][0]) for a in preds}
                    patients = [p for _, _, p in items]
                    for measure in ind["base"]:
                        per[(name, measure)].append(
                            (patients, ind["base"][measure], ind[arm][measure])
                        )
                    stats[f"{name} | COVID19 AUC"].append(covid_auc(items, preds[arm][2]))
                    argmax, _, _, runner_up, shown = preds[arm]
                    if name == FOLDERS[0]:
                        t = covid_threshold(shown)
                        stats["COVID19 cut-off (chosen on validation)"].append(t)
                    at_t = indicators(items, called_at(argmax, shown, runner_up, t))
                    for measure, v in at_t.items():
                        kept = v[~np.isnan(v)]
                        if len(kept):
                            stats[f"{name} | {measure} @cut-off"].append(float(kept.mean()))
                    if name == "cxr-external":
                        stats["cxr-external | refused by the bedside"].append(
                            int(sum(preds[arm][1]))
                        )
                meta = json.loads((root / arm / "model.json").read_text())
                val = (meta.get("metrics") or {}).get("validation") or {}
                stats["stage validation accuracy"].append(val.get("accuracy"))
                test_json = root / f"{arm}-test.json"
                if test_json.is_file():
                    m = json.loads(test_json.read_text())
                    stats["test patients | macro AUC"].append(m.get("macro_auc"))
                    stats["test patients | accuracy"].append(m.get("accuracy"))
            block["arms"][arm] = {
                "seeds": len(stats["stage validation accuracy"]),
                "stats": dict(stats),
                "vs_base": {
                    f"{name} | {measure}": paired(v)
                    for (name, measure), v in per.items()
                    if not all(np.isnan(a).all() for _, a, _ in v)
                },
            }
        result["settings"][setting] = block
    oct_rows = []
    for s in seeds:
        f = out / f"s{s}" / "oct" / "base-test.json"
        if f.is_file():
            m = json.loads(f.read_text())
            oct_rows.append({"seed": s, "accuracy": m["accuracy"], "macro_auc": m.get("macro_auc"),
                             "ci95": m.get("ci95", {}).get("accuracy")})  # fmt: skip
    result["oct"] = oct_rows
    result["federated"] = federated(out)
    args.json.write_text(json.dumps(result, indent=1))
    for setting, block in result["settings"].items():
        for arm, r in block["arms"].items():
            print(f"\n## {setting} / {arm} ({r['seeds']} seeds)")
            for key, vals in r["stats"].items():
                v = [x for x in vals if x is not None]
                print(f"{key:60s} " + (f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "—"))
            if arm == "base":
                continue
            for key, v in r["vs_base"].items():
                lo, hi = v["ci95"]
                print(f"{key:60s} base {v['a']:.3f} → {v['b']:.3f}  Δ {v['diff']:+.3f} "
                      f"[{lo:+.3f}, {hi:+.3f}]  ({v['films']} films)")  # fmt: skip
    print("\nOCT:", json.dumps(oct_rows))
    for setting, arms in result["federated"].items():
        for arm, seeds_ in arms.items():
            keys = [k for k in seeds_[0] if k != "seed"]
            cells = [f"{k} {np.mean([r[k] for r in seeds_ if k in r]):.3f}" for k in keys]
            print(f"federated {setting} / {arm} ({len(seeds_)} seeds): " + ", ".join(cells))


if __name__ == "__main__":
    main()
