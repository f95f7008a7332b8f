#!/usr/bin/env bash
# Builds what a real node needs beyond the control plane: kubelet, kube-scheduler and
# kube-proxy 1.20.2,
# from the same Debian source package and with the same fix as scripts/build-kubernetes.sh
# (Debian's reflect2 1.0.2, CGO_ENABLED=0), plus the pod sandbox ("pause") image, built from the
# same source's build/pause/linux/pause.c as an OCI archive for `ctr images import` (no
# registry is reachable here). Once, into the control plane's cache folder
# (~/.cache/kinsight/k8s-1.20.2/bin; KINSIGHT_CACHE moves it); prints that folder.
# About 5 minutes cold on 2 cores; nothing to do afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
CACHE="${KINSIGHT_CACHE:-$HOME/.cache/kinsight}"
OUT="$CACHE/k8s-1.20.2/bin"
PAUSE_IMAGE=localhost/kinsight-pause:3.4.1
BINARIES=(kubelet kube-scheduler kube-proxy)
# The kubelet is built with Kubernetes' `dockerless` tag: without Docker's cAdvisor plugin,
# which otherwise looks for /var/run/docker.sock once a second for 5 s before the kubelet
# starts (this node runs containerd only). A kubelet without this stamp was built without
# the tag and is built again.
KUBELET_TAGS=dockerless
missing_binaries() {
  local b
  for b in "${BINARIES[@]}"; do [ -x "$OUT/$b" ] || echo "$b"; done
  if [ -x "$OUT/kubelet" ] && [ "$(cat "$OUT/kubelet.tags" 2>/dev/null)" != "$KUBELET_TAGS" ]; then
    echo kubelet
  fi
}
if [ -z "$(missing_binaries)" ] && [ -s "$OUT/pause.tar" ]; then
  echo "$OUT"; exit 0
fi
mkdir -p "$OUT"
# One builder at a time (setup.sh and test.sh may both ask).
exec 9>"$CACHE/build-node.lock"
flock 9
if [ -z "$(missing_binaries)" ] && [ -s "$OUT/pause.tar" ]; then
  echo "$OUT"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if [ ! -f /etc/apt/sources.list.d/debian-src.sources ]; then
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
    > /etc/apt/sources.list.d/debian-src.sources
fi
need=()
for p in golang-go golang-github-modern-go-reflect2-dev dpkg-dev gcc libc6-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq >&2
  apt-get install -y -qq "${need[@]}" >&2
fi
# Its own source folder, so that it never races scripts/build-kubernetes.sh.
WORK="$CACHE/k8s-node-src"
mkdir -p "$WORK"
cd "$WORK"
SRC=$(ls -d kubernetes-1.20*/ 2>/dev/null | head -n1 || true)
if [ -z "$SRC" ]; then
  apt-get source -qq kubernetes >&2
  SRC=$(ls -d kubernetes-1.20*/ | head -n1)
fi
cd "$SRC"
MISSING=$(missing_binaries)
if [ -n "$MISSING" ]; then
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/
  rm -f vendor/github.com/modern-go/reflect2/go.mod
  mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
  GOHOME="$(mktemp -d)"
  # The kubelet on its own: only it takes the tags.
  OTHERS="" KUBELET=""
  for b in $MISSING; do
    if [ "$b" = kubelet ]; then KUBELET=1; else OTHERS+="cmd/$b "; fi
  done
  if [ -n "$OTHERS" ]; then
    GOPATH=$PWD/.go CGO_ENABLED=0 HOME="$GOHOME" make WHAT="$OTHERS" >&2
  fi
  if [ -n "$KUBELET" ]; then
    GOPATH=$PWD/.go CGO_ENABLED=0 HOME="$GOHOME" make WHAT=cmd/kubelet GOFLAGS="-tags=$KUBELET_TAGS" >&2
  fi
  rm -rf "$GOHOME"
  for b in $MISSING; do cp "_output/local/bin/linux/amd64/$b" "$OUT/"; done
  if [ -n "$KUBELET" ]; then echo "$KUBELET_TAGS" > "$OUT/kubelet.tags"; fi
fi
# The pod sandbox image: Kubernetes' own pause, static, as the only file of the image.
if [ ! -s "$OUT/pause.tar" ]; then
  PAUSE_DIR="$(mktemp -d)"
  gcc -Os -Wall -Werror -static -DVERSION=v3.4.1-kinsight -o "$PAUSE_DIR/pause" build/pause/linux/pause.c
  cd "$REPO"
  container="$(scripts/buildah.sh from scratch)"
  scripts/buildah.sh copy "$container" "$PAUSE_DIR/pause" /pause >/dev/null
  scripts/buildah.sh config --entrypoint '["/pause"]' --user 65535:65535 "$container"
  scripts/buildah.sh commit -q "$container" "$PAUSE_IMAGE" >/dev/null
  scripts/buildah.sh rm "$container" >/dev/null
  rm -f "$OUT/pause.tar.part"
  scripts/buildah.sh push --quiet "$PAUSE_IMAGE" "oci-archive:$OUT/pause.tar.part:$PAUSE_IMAGE"
  mv "$OUT/pause.tar.part" "$OUT/pause.tar"
  rm -rf "$PAUSE_DIR"
fi
# The source tree and Go build cache are large (about 2 GB); only the binaries are kept.
cd "$CACHE" && rm -rf "$WORK"
echo "$OUT"
