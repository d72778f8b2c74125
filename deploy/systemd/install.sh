#!/usr/bin/env sh
# Install fedbridge as a service on this machine, from a checkout of the repository:
#   sudo deploy/systemd/install.sh coordinator|site|edge
# Creates the system user `fedbridge`, the venv /opt/fedbridge/venv (pinned by constraints.txt;
# the edge venv sees JetPack's TensorRT bindings), /etc/fedbridge and /var/lib/fedbridge, and the
# unit; never overwrites an existing /etc/fedbridge/*.env. Start it after editing that file:
#   sudo systemctl enable --now fedbridge-ROLE
# FEDBRIDGE_ROOT=/some/dir installs under that folder instead of / (a rehearsal; no systemctl).
set -eu
role=${1:?usage: install.sh coordinator|site|edge}
root=${FEDBRIDGE_ROOT:-}
src=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
case "$role" in
  coordinator) extra=server; unit="$src/deploy/systemd/fedbridge-coordinator.service" ;;
  site) extra=client; unit="$src/deploy/systemd/fedbridge-site.service" ;;
  edge) extra=edge; unit="$src/deploy/jetson/fedbridge-edge.service" ;;
  *) echo "error: role '$role': expected coordinator, site or edge" >&2; exit 2 ;;
esac
if [ -z "$root" ] && ! id fedbridge >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/fedbridge --shell /usr/sbin/nologin fedbridge
fi
if [ "$role" = coordinator ] && [ -z "$root" ] && ! command -v nginx >/dev/null 2>&1; then
  apt-get update && apt-get install -y --no-install-recommends nginx-light  # the sites' entrance
fi
install -d -m 0755 "$root/opt/fedbridge"
install -d -m 0750 "$root/etc/fedbridge" "$root/var/lib/fedbridge"
if [ "$role" = edge ]; then
  "$python" -m venv --system-site-packages "$root/opt/fedbridge/venv"  # JetPack's tensorrt
else
  "$python" -m venv "$root/opt/fedbridge/venv"
fi
"$root/opt/fedbridge/venv/bin/python" -m pip install --quiet -c "$src/constraints.txt" "$src[$extra]"
env_example="$src/deploy/systemd/$role.env.example"
if [ -f "$env_example" ] && [ ! -e "$root/etc/fedbridge/$role.env" ]; then
  install -m 0640 "$env_example" "$root/etc/fedbridge/$role.env"
fi
install -d "$root/etc/systemd/system"
install -m 0644 "$unit" "$root/etc/systemd/system/"
if [ -z "$root" ]; then
  chown -R fedbridge:fedbridge /var/lib/fedbridge
  chgrp -R fedbridge /etc/fedbridge
  systemctl daemon-reload
fi
echo "installed $(basename "$unit"); edit $root/etc/fedbridge/$role.env, then: systemctl enable --now $(basename "$unit" .service)"
