#!/usr/bin/env bash
# Makes localhost/kinsight-base:local, a small base image for kinsight without any registry:
# what gcr.io/distroless/cc-debian12:nonroot holds that kinsight uses, taken from this
# (Debian 12) machine. That is glibc's libraries and loader, libgcc_s and libstdc++ (what
# `ldd` lists for kinsight and for ONNX Runtime's libonnxruntime.so), the CA certificates,
# /etc/passwd and /etc/group with `nonroot` (65532), its home and /tmp. No shell, no package
# manager. Prints the image's name. Made again only when one of those files (or this
# script) changed: the image carries a hash of them in a label.
#
#   scripts/make-base-image.sh           # then: scripts/build-image.sh --base local
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=localhost/kinsight-base:local
MULTIARCH=/usr/lib/x86_64-linux-gnu
# glibc (libc6) as distroless ships it, less its debugging and profiling helpers.
LIBS=(ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libmvec.so.1 libdl.so.2 libpthread.so.0
  librt.so.1 libresolv.so.2 libanl.so.1 libutil.so.1 libnss_files.so.2 libnss_dns.so.2
  libgcc_s.so.1 libstdc++.so.6)
CA=/etc/ssl/certs/ca-certificates.crt
for f in "${LIBS[@]/#/$MULTIARCH/}" "$CA"; do
  [ -e "$f" ] || { echo "missing $f (a Debian 12 amd64 host with ca-certificates is expected)" >&2; exit 1; }
done

# One maker at a time (a test and a build may ask at once).
LOCK="${KINSIGHT_CACHE:-$HOME/.cache/kinsight}/buildah/make-base-image.lock"
mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
flock 9

inputs="$( (cat "$0"; sha256sum "${LIBS[@]/#/$MULTIARCH/}" "$CA") | sha256sum | cut -c1-64)"
have="$(scripts/buildah.sh inspect --type image --format '{{index .OCIv1.Config.Labels "kinsight.base.inputs"}}' \
  "$IMAGE" 2>/dev/null || true)"
if [ "$have" = "$inputs" ]; then
  echo "$IMAGE"
  exit 0
fi

ROOTFS="$(mktemp -d)"
container=""
cleanup() {
  rm -rf "$ROOTFS"
  if [ -n "$container" ]; then scripts/buildah.sh rm "$container" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
# Debian 12's merged /usr: /lib and /lib64 are links into /usr.
mkdir -p "$ROOTFS$MULTIARCH" "$ROOTFS/usr/lib64" "$ROOTFS/usr/local/bin" "$ROOTFS/etc/ssl/certs" \
  "$ROOTFS/tmp" "$ROOTFS/home/nonroot" "$ROOTFS/root"
ln -s usr/lib "$ROOTFS/lib"
ln -s usr/lib64 "$ROOTFS/lib64"
ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$ROOTFS/usr/lib64/ld-linux-x86-64.so.2"
for lib in "${LIBS[@]}"; do cp -L "$MULTIARCH/$lib" "$ROOTFS$MULTIARCH/$lib"; done
cp -L "$CA" "$ROOTFS$CA"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
  >"$ROOTFS/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$ROOTFS/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$ROOTFS/etc/nsswitch.conf"
chmod 1777 "$ROOTFS/tmp"
chmod 700 "$ROOTFS/root" "$ROOTFS/home/nonroot"
chown 65532:65532 "$ROOTFS/home/nonroot"

container="$(scripts/buildah.sh from scratch)"
mount="$(scripts/buildah.sh mount "$container")"
tar -C "$ROOTFS" -cf - . | tar -C "$mount" -xpf - --numeric-owner
scripts/buildah.sh umount "$container" >/dev/null
# The same configuration as distroless's :nonroot images.
scripts/buildah.sh config --user 65532 --workingdir /home/nonroot \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env SSL_CERT_FILE="$CA" --label kinsight.base.inputs="$inputs" "$container"
old="$(scripts/buildah.sh inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)"
scripts/buildah.sh commit -q --rm "$container" "$IMAGE" >/dev/null
container=""
# The image this one replaced, unless something still uses it.
if [ -n "$old" ]; then scripts/buildah.sh rmi "$old" >/dev/null 2>&1 || true; fi
echo "$IMAGE"
