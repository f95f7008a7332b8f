#!/usr/bin/env bash
# Builds kinsight's container image from ./Dockerfile with buildah (installed when missing;
# vfs storage, chroot isolation: see scripts/buildah.sh), without a registry: on the local
# base (scripts/make-base-image.sh) unless --base names an image already in the store. The
# build context is a folder staged for it, holding only what the image gets: the binary with
# its debug info stripped, the bundled models and ONNX Runtime's library. Prints the image's
# name and size. Safe to run again: the image a rebuild replaces is removed.
#
#   scripts/build-image.sh                       # localhost/kinsight:<chart appVersion>
#   scripts/build-image.sh --tag dev --oci-archive target/kinsight.tar   # for `ctr images import`
#   scripts/build-image.sh --cuda --tag cuda     # with ONNX Runtime built for CUDA (see README)
#
# Options:
#   --binary PATH        kinsight binary (default: target/release/kinsight)
#   --tag TAG            tag of localhost/kinsight (default: the chart's appVersion)
#   --base local|IMAGE   base image: `local` (made here) or one already in the store, e.g. after
#                        `scripts/buildah.sh pull gcr.io/distroless/cc-debian12:nonroot`
#   --cuda               ONNX Runtime from the onnxruntime-gpu wheel (scripts/fetch-onnxruntime-cuda.sh)
#   --ort-lib PATH       this libonnxruntime.so instead (its provider libraries come along)
#   --keep-debug         keep the binary's debug info (line tables; about 5x the size)
#   --oci-archive FILE   also write the image to FILE as an OCI archive
#   --stage-only DIR     only stage the build context into DIR (e.g. for `docker build`)
set -euo pipefail
cd "$(dirname "$0")/.."
BINARY=target/release/kinsight
TAG="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/kinsight/Chart.yaml)"
BASE=local
ORT_LIB=""
CUDA=false
STRIP=true
ARCHIVE=""
STAGE_ONLY=""
usage() { sed -n '/^# Options:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY="${2:?}"; shift 2 ;;
    --tag) TAG="${2:?}"; shift 2 ;;
    --base) BASE="${2:?}"; shift 2 ;;
    --cuda) CUDA=true; shift ;;
    --ort-lib) ORT_LIB="${2:?}"; shift 2 ;;
    --keep-debug) STRIP=false; shift ;;
    --oci-archive) ARCHIVE="${2:?}"; shift 2 ;;
    --stage-only) STAGE_ONLY="${2:?}"; shift 2 ;;
    *) usage ;;
  esac
done
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || { echo "not an image tag: '$TAG'" >&2; exit 2; }
[ -x "$BINARY" ] || { echo "no kinsight binary at $BINARY (cargo build --release --locked)" >&2; exit 1; }
if [ -z "$ORT_LIB" ]; then
  if $CUDA; then ORT_LIB="$(scripts/fetch-onnxruntime-cuda.sh)"; else ORT_LIB="$(scripts/setup-onnxruntime.sh --runtime)"; fi
fi
ORT_LIB="$(realpath "$ORT_LIB")"
IMAGE="localhost/kinsight:$TAG"

# The build context.
if [ -n "$STAGE_ONLY" ]; then
  CONTEXT="$STAGE_ONLY"
  # Emptied first, so only a folder this script staged before (or an empty one).
  if [ -n "$(ls -A "$CONTEXT" 2>/dev/null)" ] && [ ! -f "$CONTEXT/.kinsight-image-context" ]; then
    echo "$CONTEXT is not empty and not a staged context: not touching it" >&2
    exit 2
  fi
  rm -rf "$CONTEXT"
  mkdir -p "$CONTEXT"
  touch "$CONTEXT/.kinsight-image-context"
else
  CONTEXT="$(mktemp -d)"
  trap 'rm -rf "$CONTEXT"' EXIT
fi
mkdir -p "$CONTEXT/models" "$CONTEXT/onnxruntime"
if $STRIP; then objcopy --strip-debug "$BINARY" "$CONTEXT/kinsight"; else cp "$BINARY" "$CONTEXT/kinsight"; fi
# The content_safety model is fetched (not committed); its licence notice travels with it.
scripts/fetch-open-nsfw.sh >/dev/null
cp models/catalog.yaml models/*.onnx models/*.labels models/*.LICENSE models/README.md "$CONTEXT/models/"
# Under the name the image's ORT_DYLIB_PATH (and the chart's ortDylibPath) gives; ONNX Runtime
# looks for its provider libraries (CUDA's) beside it. TensorRT's is left out: kinsight
# does not use it.
cp "$ORT_LIB" "$CONTEXT/onnxruntime/libonnxruntime.so"
for provider in shared cuda; do
  lib="$(dirname "$ORT_LIB")/libonnxruntime_providers_$provider.so"
  if [ -f "$lib" ]; then cp "$lib" "$CONTEXT/onnxruntime/"; fi
done
if [ -n "$STAGE_ONLY" ]; then
  echo "staged in $CONTEXT: $(du -sh "$CONTEXT" | cut -f1)"
  exit 0
fi

if [ "$BASE" = local ]; then BASE="$(scripts/make-base-image.sh)"; fi
old="$(scripts/buildah.sh inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)"
start=$(date +%s.%N)
scripts/buildah.sh bud --quiet --pull-never --layers=false --isolation chroot \
  --build-arg BASE="$BASE" -f "$PWD/Dockerfile" -t "$IMAGE" "$CONTEXT" >/dev/null
seconds="$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
new="$(scripts/buildah.sh inspect --type image --format '{{.FromImageID}}' "$IMAGE")"
if [ -n "$old" ] && [ "$old" != "$new" ]; then scripts/buildah.sh rmi "$old" >/dev/null 2>&1 || true; fi
if [ -n "$ARCHIVE" ]; then
  mkdir -p "$(dirname "$ARCHIVE")"
  rm -f "$ARCHIVE"
  scripts/buildah.sh push --quiet "$IMAGE" "oci-archive:$ARCHIVE:$IMAGE"
fi

size() { du -sh --apparent-size "$@" | cut -f1; }
echo "$IMAGE: $(scripts/buildah.sh images --noheading --format '{{.Size}}' "$IMAGE"), built in $seconds s on $BASE"
echo "  payload $(size "$CONTEXT"): kinsight $(size "$CONTEXT/kinsight"), models/ $(size "$CONTEXT/models"), onnxruntime/ $(size "$CONTEXT/onnxruntime")"
if [ -n "$ARCHIVE" ]; then echo "  OCI archive $ARCHIVE: $(size "$ARCHIVE")"; fi
