#!/usr/bin/env bash
# Runs buildah on kinsight's own image store, installing buildah (Debian's package) first when
# it is missing. The store is vfs under ~/.cache/kinsight/buildah (KINSIGHT_CACHE moves it),
# with chroot isolation: no daemon, no overlay mounts and no user namespaces needed, which is
# what works on a machine like this one (root in a container). The image scripts use it, and
# so can you:
#
#   scripts/buildah.sh images                        # what scripts/build-image.sh made
#   scripts/buildah.sh inspect localhost/kinsight:dev
#
# Exits 77 when buildah is missing and cannot be installed (not root, or no apt-get).
set -euo pipefail
if ! command -v buildah >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "buildah is not installed, and it takes root and apt-get to install it here" >&2
    exit 77
  fi
  echo "installing buildah (apt-get) ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  # The package lists may be missing or stale on a fresh machine.
  apt-get install -y -qq --no-install-recommends buildah >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends buildah >/dev/null; } ||
    { echo "apt-get could not install buildah" >&2; exit 77; }
fi
STORE="${KINSIGHT_CACHE:-$HOME/.cache/kinsight}/buildah"
mkdir -p "$STORE/root" "$STORE/runroot"
export BUILDAH_ISOLATION=chroot
exec buildah --root "$STORE/root" --runroot "$STORE/runroot" --storage-driver vfs "$@"
