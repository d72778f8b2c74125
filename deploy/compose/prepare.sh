#!/usr/bin/env sh
# Lay out deploy/compose/fed/ for docker-compose.yml: certificates (valid for the host name
# "coordinator"), one key pair per site, each site's images, the test set and the bridge bundle.
# Usage: deploy/compose/prepare.sh SPLIT_DIR BRIDGE_BUNDLE   (SPLIT_DIR from `fedbridge data split --sites 3`)
set -eu
split=${1:?usage: prepare.sh SPLIT_DIR BRIDGE_BUNDLE}
bridge=${2:?usage: prepare.sh SPLIT_DIR BRIDGE_BUNDLE}
fed=${FED_DIR:-$(dirname "$0")/fed}
if [ "$(id -u)" = 0 ] && [ -z "${FEDBRIDGE_UID:-}" ]; then
  echo "error: run prepare.sh as the user who will own the federation's files, not root" >&2
  exit 2
fi
mkdir -p "$fed/data" "$fed/keys" "$fed/secrets" "$fed/out" "$fed/home"
fedbridge server certs --out "$fed/certs" --cert-host coordinator
for i in 1 2 3; do
  fedbridge site keys --name "site-$i" --out "$fed/keys"
  mkdir -p "$fed/secrets/site-$i" "$fed/state/site-$i"
  cp "$fed/certs/ca.crt" "$fed/secrets/site-$i/ca.crt"
  mv "$fed/keys/site-$i.key" "$fed/secrets/site-$i/site.key"   # the private key stays with its site
  cp -R "$split/site-$i" "$fed/data/site-$i"
  # the site's own patient manifest, so its local validation split is by patient
  python3 - "$split/split.csv" "site-$i" "$fed/data/site-$i/MANIFEST.csv" <<'PY'
import csv, sys
src, part, dst = sys.argv[1:]
with open(src, newline="") as f, open(dst, "w", newline="") as g:
    w = csv.writer(g)
    w.writerow(["path", "label", "patient_id"])
    for r in csv.DictReader(f):
        if r["part"] == part:
            w.writerow([r["path"].split("/", 1)[1], r["label"], r["patient_id"]])
PY
done
cp -R "$split/test" "$fed/test"
cp -R "$bridge" "$fed/bridge"
# the containers run as this user, so they read the 0600 keys and write the run folders
printf 'FEDBRIDGE_UID=%s\nFEDBRIDGE_GID=%s\n' "${FEDBRIDGE_UID:-$(id -u)}" "${FEDBRIDGE_GID:-$(id -g)}" \
  > "${ENV_FILE:-$(dirname "$0")/.env}"
echo "ready in $fed: docker compose -f $(dirname "$0")/docker-compose.yml up --build --abort-on-container-exit --exit-code-from coordinator"
