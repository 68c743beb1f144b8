#!/usr/bin/env bash
# Make a local stand-in for the Dockerfile's default base image (python:3.11-slim-bookworm)
# from Debian's own packages, for machines that cannot pull from public container registries.
#
#   scripts/image/base-image.sh [IMAGE]        # prints the image name on stdout when done
#
# Debian bookworm's python3 is 3.11, the same minor version as the default base, and the
# Dockerfile only needs `python3 -m venv` from its base, which python3-venv provides.
#
# Cached in two places so repeated test runs on one machine cost nothing:
#   1. podman's image store (reused when IMAGE already exists there);
#   2. a tarball of the root filesystem under $AUTHZ_IMAGE_CACHE (default
#      /var/tmp/authz-image-cache), re-imported if the image was removed from the store.
# Only when both are missing is the root filesystem made with debootstrap (~1 min, needs root
# and the Debian mirror). Bump RECIPE when the package list or the slimming below changes:
# the tarball's name carries it, so an old cache is never mistaken for the new recipe.
set -euo pipefail

RECIPE=1
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
IMAGE=${1:-localhost/authz-py-base:${SUITE}-r${RECIPE}}
CACHE_DIR=${AUTHZ_IMAGE_CACHE:-/var/tmp/authz-image-cache}
TARBALL="$CACHE_DIR/py-base-${SUITE}-r${RECIPE}.tar"

log() { printf 'base-image: %s\n' "$*" >&2; }

for tool in podman tar flock; do
  command -v "$tool" >/dev/null || { log "missing '$tool' (apt-get install podman)"; exit 2; }
done

mkdir -p "$CACHE_DIR"
# Two test runs (or two engineers) on one machine must not debootstrap into the same cache at
# once; the second waits for the first and then finds the image ready. 15 min bounds the wait
# far above the ~1 min a build takes.
exec 9>"$CACHE_DIR/lock"
flock -w 900 9 || { log "timed out waiting for $CACHE_DIR/lock"; exit 1; }

if podman image exists "$IMAGE"; then
  log "$IMAGE already present"
  echo "$IMAGE"
  exit 0
fi

import_tarball() {
  # The same settings the official python images carry, so the Dockerfile sees a familiar base.
  podman import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    "$TARBALL" "$IMAGE" >/dev/null
}

if [[ -s "$TARBALL" ]]; then
  log "importing cached root filesystem $TARBALL"
  import_tarball
  echo "$IMAGE"
  exit 0
fi

command -v debootstrap >/dev/null || { log "missing 'debootstrap' (apt-get install debootstrap)"; exit 2; }

# Use the mirror apt on this machine already uses (the only package source reachable here),
# falling back to Debian's public mirror.
MIRROR=${DEBIAN_MIRROR:-}
if [[ -z "$MIRROR" && -r /etc/apt/sources.list.d/debian.sources ]]; then
  MIRROR=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [[ -z "$MIRROR" && -r /etc/apt/sources.list ]]; then
  MIRROR=$(awk '$1 == "deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}

WORK=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
cleanup() {
  # debootstrap mounts /proc and /sys inside the target; never leave them mounted.
  umount -R "$WORK/root/proc" 2>/dev/null || true
  umount -R "$WORK/root/sys" 2>/dev/null || true
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

log "debootstrap $SUITE from $MIRROR (about a minute)"
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$WORK/root" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1; then
  tail -n 30 "$WORK/debootstrap.log" >&2
  log "debootstrap failed"
  exit 1
fi

# Slim it the way the official -slim images are: no package lists, caches, docs or locales
# (~145 MB of the ~275 MB debootstrap leaves).
rm -rf "$WORK/root"/var/lib/apt/lists/* "$WORK/root"/var/cache/apt/* \
  "$WORK/root"/usr/share/doc/* "$WORK/root"/usr/share/man/* "$WORK/root"/usr/share/info/* \
  "$WORK/root"/usr/share/locale/* "$WORK/root"/var/log/*.log "$WORK/root"/var/log/apt/*

tar -C "$WORK/root" --numeric-owner -cf "$TARBALL.partial" .
mv "$TARBALL.partial" "$TARBALL"
import_tarball
log "built $IMAGE (root filesystem cached in $TARBALL)"
echo "$IMAGE"
