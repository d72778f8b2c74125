#!/usr/bin/env bash
# Issue #29 study: does training on adult non-COVID films at the *target* stage (NIH NORMAL as
# NORMAL, NIH "Pneumonia" as BACTERIAL|VIRAL through the partial-label loss) break the
# "adult ⇒ COVID19" shortcut? Seeds × {mixed sources, the paper's setting} × {base, adult}, and
# OCT, with the product's commands only. Default: the cheap model (MobileNet-V1 0.25 @ 128) so 3
# seeds fit 2 CPU cores (MODEL, SIZE, WEIGHTS select another, e.g. mobilenetv2_100, 224,
# mobilenetv2_100_tfslim_quant_in1k.safetensors). Arms (ARMS): base = the split's training
# patients; adult = + 80 % of the NIH adult patients (NORMAL, and "Pneumonia" as
# BACTERIAL|VIRAL); adultbal = the same with class-balanced sampling (--balanced). The recipe is
# chosen on *validation* films (held-out NIH adult patients + each stage's own validation
# patients), then reported on the test patients and cxr-external.
# OCT=0 skips the OCT arm (e.g. at a model whose OCT result is already known); SETTINGS="paper"
# runs one CXR setting only.
# Usage: bench/shortcut_study.sh OUT [SEED…]      (default seeds 0 1 2; rerunning skips done work)
set -euo pipefail
OUT=${1:?usage: bench/shortcut_study.sh OUT [SEED…]}; shift
SEEDS=("${@:-0 1 2}")
ARMS=${ARMS:-base adultbal}
D=${DATA:-../shared/data}
MODEL=${MODEL:-mobilenetv1_025}; SIZE=${SIZE:-128}
W=${FEDBRIDGE_WEIGHTS_DIR:-../shared/weights}/${WEIGHTS:-mobilenetv1_025_tfslim_quant_in1k_128.safetensors}
FB="${PYTHON:-python} -m fedbridge"
MAP='PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA'
COMMON=(--device cpu --epochs "${TARGET_EPOCHS:-4}" --augment-per-sample "${TARGET_AUGMENT:-0}")
T() { /usr/bin/time -f "$1 %e s wall, %U s user" -a -o "$OUT/times.txt" "${@:2}"; }
mkdir -p "$OUT"

# The paper's setting: COVID19 from ieee8023, every other class from Kermany (as the paper did).
if [ ! -f "$OUT/data/MANIFEST.csv" ]; then
  python - "$D" "$OUT/data" <<'PY'
import csv, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
rows = list(csv.DictReader((src / "MANIFEST.csv").open()))
keep = [r for r in rows if r["path"].startswith("cxr/") and (
    (r["label"] == "COVID19") == r["source_dataset"].startswith("ieee8023"))]
tmp = dst.with_name(dst.name + ".tmp"); shutil.rmtree(tmp, ignore_errors=True)
for r in keep:
    r["path"] = "paper/" + r["path"].removeprefix("cxr/")
    (tmp / r["path"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / ("cxr/" + r["path"].removeprefix("paper/")), tmp / r["path"])
with (tmp / "MANIFEST.csv").open("w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0])); w.writeheader(); w.writerows(keep)
tmp.rename(dst)
print(f"paper setting: {len(keep)} films")
PY
fi
# NIH adult films: 80 % of patients for target training, 20 % for the recipe decision (validation).
[ -d "$OUT/adult" ] || $FB data split "$D/bridge/cxr-adult" --out "$OUT/adult" --sites 1 \
  --test-fraction 0.2 --seed 0
[ -f "$OUT/bridge-cxr/model.json" ] || T bridge-cxr $FB bridge "$D/bridge/cxr" --out "$OUT/bridge-cxr" \
  --init "$W" --model "$MODEL" --image-size "$SIZE" --epochs "${BRIDGE_EPOCHS:-2}" --device cpu --seed 0
[ "${OCT:-1}" = 0 ] || [ -f "$OUT/bridge-oct/model.json" ] || T bridge-oct $FB bridge "$D/bridge/oct" --out "$OUT/bridge-oct" \
  --init "$W" --model "$MODEL" --image-size "$SIZE" --epochs 4 --device cpu --seed 0 --modality oct

evaluate() {  # bundle folder name json [extra…]
  if [ ! -f "$3" ]; then
    $FB evaluate "$1" "$2" --json --bootstrap 500 "${@:4}" > "$3.tmp"; mv "$3.tmp" "$3"
  fi
}
for s in ${SEEDS[@]}; do
  for setting in ${SETTINGS:-mixed paper}; do
    data="$D/cxr"; [ $setting = paper ] && data="$OUT/data/paper"
    split="$OUT/s$s/$setting/split"
    [ -d "$split" ] || $FB data split "$data" --out "$split" --sites 1 --test-fraction 0.3 --seed "$s"
    for arm in $ARMS; do
      t="$OUT/s$s/$setting/$arm"
      extra=()
      [ $arm != base ] && extra=("$OUT/adult/site-1" --label-map "$MAP")
      [ $arm = adultbal ] && extra+=(--balanced)
      [ -f "$t/model.json" ] || T "s$s-$setting-$arm" $FB train "$split/site-1" "${extra[@]}" \
        --out "$t" --init "$OUT/bridge-cxr" --seed "$s" "${COMMON[@]}"
      [ -f "$t.onnx" ] || $FB export onnx "$t" --out "$t.onnx" --val-data "$split/site-1"
      evaluate "$t" "$split/test" "$t-test.json"
      evaluate "$t" "$OUT/adult/test" "$t-adultval.json" --label-map "$MAP"
      evaluate "$t" "$D/cxr-external" "$t-external.json" --label-map "$MAP" --onnx "$t.onnx"
    done
  done
  [ "${OCT:-1}" = 0 ] && continue
  split="$OUT/s$s/oct/split"; t="$OUT/s$s/oct/base"
  [ -d "$split" ] || $FB data split "$D/oct" --out "$split" --sites 1 --test-fraction 0.3 --seed "$s"
  [ -f "$t/model.json" ] || T "s$s-oct" $FB train "$split/site-1" --out "$t" --init "$OUT/bridge-oct" \
    --seed "$s" "${COMMON[@]}"
  evaluate "$t" "$split/test" "$t-test.json"
done
echo "study done: $OUT"
