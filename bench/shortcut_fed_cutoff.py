"""Issue #29: the federated arms' bedside models with a COVID19 cut-off chosen on validation.

For each federated model of `bench/shortcut_headline_fed.sh` / `bench/shortcut_fed_adult.sh`
(``OUT/s*/SETTING/fed-SITES/{fed,fedadult}``): export the bedside ONNX (``fedbridge export onnx
--val-data`` the split's site-1, else site-2 or site-3, training images: the federation has
no central validation set), choose the cut-off on the held-out NIH validation films with the
bedside's rule, and read cxr-external at the argmax and at the cut-off, with its COVID19 AUC.

Usage: python -m bench.shortcut_fed_cutoff OUT [--json bench/results/shortcut-fed-cutoff.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.shortcut_study_report import (
    called_at,
    covid_auc,
    covid_threshold,
    films,
    indicators,
    predict,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--json", type=Path, default=Path("bench/results/shortcut-fed-cutoff.json"))
    args = ap.parse_args()
    external = films(args.data / "cxr-external")
    adultval = films(args.out / "adult" / "test")
    rows: dict = defaultdict(list)
    for bundle in sorted(args.out.glob("s[0-9]*/*/fed-*/fed*/model.json")):
        bundle = bundle.parent
        root = bundle.parent
        onnx = root / f"{bundle.name}.onnx"
        for site in ("site-1", "site-2", "site-3"):  # export refuses a site whose images the
            if onnx.is_file():  # model labels no better than chance (a skewed site can be one)
                break
            subprocess.run(
                [sys.executable, "-m", "fedbridge", "export", "onnx", str(bundle), "--out",
                 str(onnx), "--val-data", str(root / "split" / site)],
                check=False, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        if not onnx.is_file():
            print(f"{bundle}: every site's images refused by export; skipped")
            continue
        row: dict = {"seed": int(root.parts[-3][1:])}
        val = predict(onnx, adultval)
        t = covid_threshold(val[4])
        ext = predict(onnx, external)
        row["cutoff"] = t
        row["external_covid_auc"] = covid_auc(external, ext[2])
        for name, labels in (("argmax", ext[0]), ("cutoff", called_at(ext[0], ext[4], ext[3], t))):
            ind = indicators(external, labels)
            for measure in ("non_covid_called_covid", "covid_recognised", "accuracy"):
                v = ind[measure]
                row[f"{name} {measure}"] = float(np.nanmean(v))
        key = f"{root.parts[-2]} / {bundle.name}, {root.name.removeprefix('fed-')}"
        rows[key].append(row)
    args.json.write_text(json.dumps(rows, indent=1))
    for key, seeds in rows.items():
        cells = [
            f"{k} {np.mean([r[k] for r in seeds]):.3f} ± {np.std([r[k] for r in seeds]):.3f}"
            for k in seeds[0]
            if k != "seed"
        ]
        print(f"{key} ({len(seeds)} seeds): " + "; ".join(cells))


if __name__ == "__main__":
    main()
