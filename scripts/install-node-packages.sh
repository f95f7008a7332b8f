#!/usr/bin/env bash
# Installs what a real testbed node runs on, from Debian's packages: containerd (its CRI plugin
# runs the pods), runc, the CNI plugins (bridge, host-local, loopback in /usr/lib/cni),
# buildah (scripts/buildah.sh: images without a daemon) and ipset (`kube-proxy --cleanup`
# removes the IPVS mode's sets with it, and fails without it). Quiet, and does nothing when they are
# all there. Exits 77 when something is missing and cannot be installed (not root, no apt-get).
set -euo pipefail
need=()
for p in containerd runc containernetworking-plugins buildah ipset; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
[ "${#need[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "missing ${need[*]}, and it takes root and apt-get to install them here" >&2
  exit 77
fi
echo "installing ${need[*]} (apt-get) ..." >&2
export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing or stale on a fresh machine.
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
  { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } ||
  { echo "apt-get could not install ${need[*]}" >&2; exit 77; }
# Debian's package enables and starts a system containerd where systemd runs; the testbed starts
# its own (own socket and state), so a system one is not needed. Nothing is stopped here.
