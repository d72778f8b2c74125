#!/usr/bin/env bash
# Issue #29: the adult-film recipe *federated*. Each site of bench/shortcut_headline_fed.sh's
# 3-site splits also holds a third of the NIH adult training patients (OUT/adult/site-1: NORMAL,
# and "Pneumonia" declared with the site's own --label-map as BACTERIAL|VIRAL), with balanced
# sampling (`--set balanced=true`); `federate simulate` 4 rounds × 1 local epoch as the base arm.
# Both the base federated model (already trained by shortcut_headline_fed.sh) and this one are
# read on the split's test patients, the held-out NIH validation films and cxr-external.
# SETTINGS="paper" runs one setting only. Usage: bench/shortcut_fed_adult.sh OUT [SEED…]
# (after shortcut_study.sh and shortcut_headline_fed.sh)
set -euo pipefail
OUT=${1:?usage: bench/shortcut_fed_adult.sh OUT [SEED…]}; shift
SEEDS=("${@:-0 1 2}")
D=${DATA:-../shared/data}
FB="${PYTHON:-python} -m fedbridge"
MAP='PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA'
T() { /usr/bin/time -f "$1 %e s wall, %U s user" -a -o "$OUT/times.txt" "${@:2}"; }
evaluate() {  # bundle folder json [extra…]
  if [ ! -f "$3" ]; then
    $FB evaluate "$1" "$2" --json --bootstrap 500 "${@:4}" > "$3.tmp"; mv "$3.tmp" "$3"
  fi
}
for s in ${SEEDS[@]}; do
  for setting in ${SETTINGS:-paper mixed}; do
    for sites in iid skew; do
      root="$OUT/s$s/$setting/fed-$sites"; split="$root/split"
      # each site's own films + its third of the NIH adult training patients (files hard-linked,
      # patient ids and sources in the site's MANIFEST.csv)
      [ -d "$root/adult-sites" ] || ${PYTHON:-python} - "$split" "$OUT/adult" "$root/adult-sites" <<'PY'
import csv, os, random, shutil, sys
from pathlib import Path
split, adult, dst = map(Path, sys.argv[1:])
def rows(folder, part):
    with (folder / "split.csv").open() as fh:
        return [r for r in csv.DictReader(fh) if r["part"] == part]
nih = rows(adult, "site-1")
patients = sorted({r["patient_id"] for r in nih}); random.Random(0).shuffle(patients)
third = {p: i % 3 + 1 for i, p in enumerate(patients)}
tmp = dst.with_name(dst.name + ".tmp"); shutil.rmtree(tmp, ignore_errors=True)
for k in (1, 2, 3):
    site, out = f"site-{k}", []
    mine = [(split, r, "") for r in rows(split, site)]
    mine += [(adult, r, "NIH-") for r in nih if third[r["patient_id"]] == k]
    for base, r, tag in mine:
        name = Path(r["path"]).name
        rel = f"{r['label']}/{tag}{name}"
        (tmp / site / r["label"]).mkdir(parents=True, exist_ok=True)
        os.link(base / r["path"], tmp / site / rel)
        src = "NIH ChestX-ray14 (adult)" if tag else r.get("source_dataset", "")
        out.append({"path": rel, "label": r["label"], "patient_id": r["patient_id"],
                    "source_dataset": src})
    with (tmp / site / "MANIFEST.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(out[0])); w.writeheader(); w.writerows(out)
tmp.rename(dst)
PY
      a="$root/adult-sites"
      [ -f "$root/fedadult/model.json" ] || T "s$s-$setting-fedadult-$sites" $FB federate simulate \
        --init "$OUT/bridge-cxr" --site "$a/site-1" --site "$a/site-2" --site "$a/site-3" \
        --label-map "$MAP" --set balanced=true \
        --out "$root/fedadult" --rounds 4 --local-epochs 1 --augment-per-sample 0 --seed "$s"
      for arm in fed fedadult; do
        evaluate "$root/$arm" "$split/test" "$root/$arm-test.json"
        evaluate "$root/$arm" "$OUT/adult/test" "$root/$arm-adultval.json" --label-map "$MAP"
        evaluate "$root/$arm" "$D/cxr-external" "$root/$arm-external.json" --label-map "$MAP"
      done
    done
  done
done
echo "federated adult-film arms done: $OUT"
