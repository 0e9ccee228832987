#!/usr/bin/env bash
# Build the service's image with the private engine of dockerd.sh:
#   build.sh IMAGE:TAG
# No registry is reachable here, and HTTPS to PyPI fails inside a build, so this
# first makes on the host what the Dockerfile needs: a Debian base image from
# debootstrap (once) and every dependency as a wheel.
set -euo pipefail

IMAGE=${1:?usage: build.sh IMAGE:TAG}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BASE=local/debian:bookworm-minbase
docker() { bash "$HERE/dockerd.sh" "$@"; }

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  rootfs=$(mktemp -d)
  # --one-file-system: never follow a /proc or /sys that a failed debootstrap left mounted.
  trap 'umount -R "$rootfs/proc" "$rootfs/sys" 2>/dev/null || true; rm -rf --one-file-system "$rootfs"' EXIT
  echo "Creating $BASE with debootstrap (about a minute, once)"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" --exclude='./var/cache/apt/archives/*.deb' -c . | docker import - "$BASE"
fi

# The image's interpreter is Debian's CPython 3.11, so the compiled wheels (orjson,
# zope.interface, ...) must be built for 3.11 too. Only dependencies and the build
# backend are kept: the service itself is built from source inside the image.
PYTHON=python3.11
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  PYTHON=/usr/bin/python3.11
fi
echo "Building wheels into $ROOT/wheels"
rm -rf "$ROOT/wheels"
log=$(mktemp)
if ! "$PYTHON" -m pip wheel --disable-pip-version-check -w "$ROOT/wheels" "$ROOT" \
  setuptools wheel >"$log" 2>&1; then
  cat "$log" >&2
  exit 1
fi
rm -f "$log" "$ROOT"/wheels/optiinfra_orchestrator-*.whl

echo "Building $IMAGE"
cd "$ROOT"
docker build --network=host --build-arg BUILDER_IMAGE="$BASE" -t "$IMAGE" .
