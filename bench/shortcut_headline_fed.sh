#!/usr/bin/env bash
# Issue #29 headline, federated and local-only arms beside bench/shortcut_study.sh's central ones:
# the same bridge (OUT/bridge-cxr) and model, 3 sites per patient-level split (IID, or label-skewed
# with Dirichlet 0.5), `federate simulate` for 4 rounds × 1 local epoch (the central arms' 4 epochs),
# no offline expansion; local-only = site-1 alone for 4 epochs. Test patients of each split.
# Usage: bench/shortcut_headline_fed.sh OUT [SEED…]   (run after bench/shortcut_study.sh OUT)
set -euo pipefail
OUT=${1:?usage: bench/shortcut_headline_fed.sh OUT [SEED…]}; shift
SEEDS=("${@:-0 1 2}")
D=${DATA:-../shared/data}
FB="${PYTHON:-python} -m fedbridge"
T() { /usr/bin/time -f "$1 %e s wall, %U s user" -a -o "$OUT/times.txt" "${@:2}"; }
evaluate() {  # bundle folder json
  if [ ! -f "$3" ]; then
    $FB evaluate "$1" "$2" --json --bootstrap 500 > "$3.tmp"; mv "$3.tmp" "$3"
  fi
}
for s in ${SEEDS[@]}; do
  for setting in paper mixed; do
    data="$D/cxr"; [ $setting = paper ] && data="$OUT/data/paper"
    for sites in iid skew; do
      root="$OUT/s$s/$setting/fed-$sites"; split="$root/split"
      skew=(); [ $sites = skew ] && skew=(--skew 0.5)
      [ -d "$split" ] || $FB data split "$data" --out "$split" --sites 3 --test-fraction 0.3 \
        --seed "$s" "${skew[@]}"
      [ -f "$root/fed/model.json" ] || T "s$s-$setting-fed-$sites" $FB federate simulate \
        --init "$OUT/bridge-cxr" --site "$split/site-1" --site "$split/site-2" --site "$split/site-3" \
        --out "$root/fed" --rounds 4 --local-epochs 1 --augment-per-sample 0 --seed "$s"
      evaluate "$root/fed" "$split/test" "$root/fed-test.json"
      [ -f "$root/local/model.json" ] || T "s$s-$setting-local-$sites" $FB train "$split/site-1" \
        --out "$root/local" --init "$OUT/bridge-cxr" --epochs 4 --augment-per-sample 0 \
        --device cpu --seed "$s"
      evaluate "$root/local" "$split/test" "$root/local-test.json"
    done
  done
done
echo "headline federated arms done: $OUT"
