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


def predict(onnx: Path, items: list[tuple[Path, str, str]]) -> tuple[list[str], list[bool]]:
    """The argmax label and whether the bedside refused it (out of distribution), per film."""
    model = Predictor(onnx, threads=2)
    labels, refused = [], []
    for path, _, _ in items:
        grey = read_image(path)
        refused.append(model.predict_array(grey, str(path)).record.ood)
        logits = model.run(normalise(resize(grey, model.spec.image_size), model.spec)[None])
        labels.append(model.labels[int(logits["logits"][0].argmax())])  # refused films too
    return labels, refused


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
        rows: dict[str, dict] = defaultdict(dict)
        per = defaultdict(list)  # (folder, measure) → per-seed (patients, base, adult)
        refusals: dict[str, list[int]] = defaultdict(list)
        for s in seeds:
            root = out / f"s{s}" / setting
            if not all((root / f"{arm}.onnx").is_file() for arm in ("base", "adult")):
                continue
            test = films(root / "split" / "test")
            for name, items in (("validation (NIH adult, held out)", adultval),
                                ("test patients", test), ("cxr-external", external)):  # fmt: skip
                preds = {arm: predict(root / f"{arm}.onnx", items) for arm in ("base", "adult")}
                ind = {arm: indicators(items, preds[arm][0]) for arm in preds}
                patients = [p for _, _, p in items]
                for measure in ind["base"]:
                    per[(name, measure)].append(
                        (patients, ind["base"][measure], ind["adult"][measure])
                    )
                if name == "cxr-external":
                    for arm in preds:
                        refusals[arm].append(int(sum(preds[arm][1])))
            for arm in ("base", "adult"):
                meta = json.loads((root / arm / "model.json").read_text())
                val = (meta.get("metrics") or {}).get("validation") or {}
                rows[arm].setdefault("stage_val_accuracy", []).append(val.get("accuracy"))
                test_json = root / f"{arm}-test.json"
                if test_json.is_file():
                    m = json.loads(test_json.read_text())
                    rows[arm].setdefault("test_macro_auc", []).append(m.get("macro_auc"))
        table = {
            f"{name} | {measure}": paired(v)
            for (name, measure), v in per.items()
            if not all(np.isnan(a).all() for _, a, _ in v)
        }
        result["settings"][setting] = {
            "paired": table, "stage": rows, "external_refused": dict(refusals),
        }  # fmt: skip
    oct_rows = []
    for s in seeds:
        f = out / f"s{s}" / "oct" / "base-test.json"
        if f.is_file():
            m = json.loads(f.read_text())
            oct_rows.append({"seed": s, "accuracy": m["accuracy"], "macro_auc": m.get("macro_auc"),
                             "ci95": m.get("ci95", {}).get("accuracy")})  # fmt: skip
    result["oct"] = oct_rows
    args.json.write_text(json.dumps(result, indent=1))
    for setting, block in result["settings"].items():
        print(f"\n## {setting}: base → adult-at-target (mean over seeds, Δ [95 % CI])")
        for key, v in block["paired"].items():
            print(f"{key:60s} {v['a']:.3f} → {v['b']:.3f}  Δ {v['diff']:+.3f} "
                  f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]  ({v['films']} films, "
                  f"{v['seeds']} seeds)")  # fmt: skip
        print("external refused by the bedside:", block["external_refused"])
        print("stage:", json.dumps(block["stage"]))
    print("\nOCT:", json.dumps(oct_rows))


if __name__ == "__main__":
    main()
