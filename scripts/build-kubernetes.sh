#!/usr/bin/env bash
# Builds etcd-backed control-plane binaries (kube-apiserver, kube-controller-manager 1.20.2)
# from Debian's source package, once, into a cache outside the checkout. Recipe and the
# reflect2 fix: shared/TESTBED.md §1. Prints the folder (KUBEBUILDER_ASSETS layout).
set -euo pipefail
CACHE="${KINSIGHT_CACHE:-$HOME/.cache/kinsight}"
OUT="$CACHE/k8s-1.20.2/bin"
if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kube-controller-manager" ] && [ -x "$OUT/etcd" ]; then
  echo "$OUT"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if [ ! -f /etc/apt/sources.list.d/debian-src.sources ]; then
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
    > /etc/apt/sources.list.d/debian-src.sources
fi
apt-get update -qq >&2
apt-get install -y -qq golang-go etcd-server golang-github-modern-go-reflect2-dev rsync jq openssl dpkg-dev >&2
WORK="$CACHE/k8s-src"
mkdir -p "$WORK" "$OUT"
cd "$WORK"
SRC=$(ls -d kubernetes-1.20*/ 2>/dev/null | head -n1 || true)
if [ -z "$SRC" ]; then
  apt-get source -qq kubernetes >&2
  SRC=$(ls -d kubernetes-1.20*/ | head -n1)
fi
cd "$SRC"
# Go 1.19 + vendored reflect2 v1.0.1 crash the apiserver at run time; Debian's 1.0.2 fixes it.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/
rm -f vendor/github.com/modern-go/reflect2/go.mod
export GOPATH=$PWD/.go CGO_ENABLED=0
mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
HOME=$(mktemp -d) make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2
cp _output/local/bin/linux/amd64/kube-apiserver _output/local/bin/linux/amd64/kube-controller-manager "$OUT/"
cp "$(command -v etcd)" "$OUT/etcd"
# The source tree and Go build cache are large; only the binaries are kept.
cd "$CACHE" && rm -rf "$WORK"
echo "$OUT"
