#!/usr/bin/env bash
# Kermany-only bridge vs Kermany + adult NIH bridge, same target training, assessed on the test
# patients of ../shared/data/cxr and on ../shared/data/cxr-external (declared label mapping).
# Cheap setting: MobileNet-V1 0.25 @ 128 px. Usage: bench/shortcut.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: bench/shortcut.sh OUT_DIR}
D=${DATA:-../shared/data}
W=${FEDBRIDGE_WEIGHTS_DIR:-/work/shared/weights}/mobilenetv1_025_tfslim_quant_in1k_128.safetensors
FB="${PYTHON:-python} -m fedbridge"
BRIDGE_EPOCHS=${BRIDGE_EPOCHS:-2}
TARGET_EPOCHS=${TARGET_EPOCHS:-6}
MAP='PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA'
mkdir -p "$OUT"
[ -d "$OUT/split" ] || $FB data split "$D/cxr" --out "$OUT/split" --sites 1 --test-fraction 0.3 --seed 0
TRAIN=$(ls -d "$OUT"/split/site* | head -1)
common=(--model mobilenetv1_025 --image-size 128 --device cpu --seed 0)
for arm in kermany kermany+adult; do
  folders=("$D/bridge/cxr"); [ "$arm" = kermany+adult ] && folders+=("$D/bridge/cxr-adult")
  b="$OUT/bridge-$arm"; t="$OUT/target-$arm"
  [ -f "$b/model.json" ] || /usr/bin/time -f "bridge $arm %e s" \
    $FB bridge "${folders[@]}" --out "$b" --init "$W" --epochs "$BRIDGE_EPOCHS" "${common[@]}"
  [ -f "$t/model.json" ] || /usr/bin/time -f "target $arm %e s" \
    $FB train "$TRAIN" --out "$t" --init "$b" --epochs "$TARGET_EPOCHS" --augment-per-sample 3 \
      --device cpu --seed 0
  [ -f "$OUT/$arm.onnx" ] || $FB export onnx "$t" --out "$OUT/$arm.onnx" --val-data "$TRAIN"
  $FB evaluate "$t" "$OUT/split/test" --out "$OUT/eval-test-$arm" --force --json --bootstrap 500 \
    > "$OUT/eval-test-$arm.json"
  $FB evaluate "$t" "$D/cxr-external" --label-map "$MAP" --onnx "$OUT/$arm.onnx" \
    --out "$OUT/eval-external-$arm" --force --json --bootstrap 500 > "$OUT/eval-external-$arm.json"
done
