#!/usr/bin/env bash
# Kermany-only bridge vs Kermany + adult NIH bridge, same target training, assessed on the test
# patients of ../shared/data/cxr and on ../shared/data/cxr-external (declared label mapping,
# bedside OOD from the exported ONNX). Cheap setting: MobileNet-V1 0.25 @ 128 px.
# Usage: bench/shortcut.sh OUT_DIR [kermany|kermany+adult …]   (arms may run in parallel)
set -euo pipefail
OUT=${1:?usage: bench/shortcut.sh OUT_DIR [ARM…]}; shift
ARMS=("${@:-kermany kermany+adult}")
D=${DATA:-../shared/data}
W=${FEDBRIDGE_WEIGHTS_DIR:-/work/shared/weights}/mobilenetv1_025_tfslim_quant_in1k_128.safetensors
FB="${PYTHON:-python} -m fedbridge"
BRIDGE_EPOCHS=${BRIDGE_EPOCHS:-1}
TARGET_EPOCHS=${TARGET_EPOCHS:-4}
TARGET_AUGMENT=${TARGET_AUGMENT:-0}
MAP='PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA'
mkdir -p "$OUT"
[ -d "$OUT/split" ] || $FB data split "$D/cxr" --out "$OUT/split" --sites 1 --test-fraction 0.3 --seed 0
TRAIN=$(ls -d "$OUT"/split/site* | head -1)
for arm in ${ARMS[@]}; do
  folders=("$D/bridge/cxr"); [ "$arm" = kermany+adult ] && folders+=("$D/bridge/cxr-adult")
  b="$OUT/bridge-$arm"; t="$OUT/target-$arm"
  [ -f "$b/model.json" ] || /usr/bin/time -f "bridge $arm %e s wall, %U s user" \
    $FB bridge "${folders[@]}" --out "$b" --init "$W" --model mobilenetv1_025 --image-size 128 \
      --epochs "$BRIDGE_EPOCHS" --device cpu --seed 0
  [ -f "$t/model.json" ] || /usr/bin/time -f "target $arm %e s wall, %U s user" \
    $FB train "$TRAIN" --out "$t" --init "$b" --epochs "$TARGET_EPOCHS" \
      --augment-per-sample "$TARGET_AUGMENT" --device cpu --seed 0
  [ -f "$OUT/$arm.onnx" ] || $FB export onnx "$t" --out "$OUT/$arm.onnx" --val-data "$TRAIN"
  $FB evaluate "$t" "$OUT/split/test" --out "$OUT/eval-test-$arm" --force --json --bootstrap 500 \
    > "$OUT/eval-test-$arm.json"
  $FB evaluate "$t" "$D/cxr-external" --label-map "$MAP" --onnx "$OUT/$arm.onnx" \
    --out "$OUT/eval-external-$arm" --force --json --bootstrap 500 > "$OUT/eval-external-$arm.json"
done
