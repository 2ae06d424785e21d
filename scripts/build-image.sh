#!/usr/bin/env bash
# Build the sidecar image without a Docker daemon or a registry: buildah (chroot isolation, vfs storage)
# on a local base image made from a Debian rootfs. Then smoke-test it and print its size.
#   bash scripts/build-image.sh            # needs root; installs buildah and debootstrap from Debian
# Env: WORK (scratch dir, default /tmp/sidecar-image), TAG (default localhost/sidecar:dev),
#      BASE (default localhost/debian-python:3.11), MIRROR (default: the Debian archive this machine's apt uses).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/sidecar-image}
TAG=${TAG:-localhost/sidecar:dev}
BASE=${BASE:-localhost/debian-python:3.11}
B=(buildah --storage-driver vfs)

debian_mirror() {
  # The archive apt itself uses for bookworm: a deb822 `.sources` stanza, or a one-line `sources.list` entry.
  local uri
  uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' /etc/apt/sources.list.d/*.sources \
    2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list \
    /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${MIRROR:-$(debian_mirror)}
# and apt's proxy, if it has one (debootstrap reads http_proxy)
if [ -z "${http_proxy:-}" ] && command -v apt-config >/dev/null; then
  eval "$(apt-config shell http_proxy Acquire::http::Proxy)"
  [ -z "${http_proxy:-}" ] || export http_proxy
fi

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
mkdir -p "$WORK"

# 1. A base image like python:3.11-slim, from Debian 12's own Python 3.11 (no registry needed).
if ! "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  rootfs="$WORK/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR"
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED      # like python:3.11-slim: pip installs system-wide
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  ctr=$("${B[@]}" from scratch)
  mnt=$("${B[@]}" mount "$ctr")
  cp -a "$rootfs"/. "$mnt"/
  "${B[@]}" umount "$ctr"
  "${B[@]}" config --env PATH=/usr/local/bin:/usr/bin:/bin --cmd python3 "$ctr"
  "${B[@]}" commit --rm "$ctr" "$BASE"
fi

# 2. The image itself, from the repository's Dockerfile. Where the machine reaches PyPI through a proxy with
#    its own CA, the host's CA bundle is mounted for the RUN steps only (it does not end up in the image).
extra=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  extra+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi
"${B[@]}" build --isolation chroot "${extra[@]}" --build-arg "BASE_IMAGE=$BASE" -t "$TAG" -f Dockerfile .

# 3. Smoke test: the entrypoint runs, as a non-root user, without a compiler in the image.
ctr=$("${B[@]}" from "$TAG")
"${B[@]}" run --isolation chroot "$ctr" -- sidecar --version
uid=$("${B[@]}" run --isolation chroot "$ctr" -- python3 -c 'import os; print(os.getuid())')
[ "$uid" != 0 ] || { echo "image runs as root" >&2; exit 1; }
if "${B[@]}" run --isolation chroot "$ctr" -- sh -c 'command -v gcc cc' >/dev/null 2>&1; then
  echo "a compiler is in the final image" >&2; exit 1
fi
"${B[@]}" rm "$ctr" >/dev/null
"${B[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E "sidecar|debian-python"
