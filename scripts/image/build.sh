#!/usr/bin/env bash
# Build the service image from the repository's Dockerfile with docker or podman.
#
#   scripts/image/build.sh [-t IMAGE:TAG] [--base BASE_IMAGE] [--push] [-- EXTRA BUILD ARGS]
#
# - Engine: $AUTHZ_IMAGE_ENGINE (docker|podman), else docker when its daemon answers, else
#   podman (with chroot isolation, which works without cgroups or user namespaces).
# - Labels: version from pyproject.toml, revision from git, source from the `origin` remote
#   (override with SOURCE_URL=...).
# - A CA bundle for pip inside the builder stage is passed as the build secret `pip_ca` when
#   $AUTHZ_PIP_CA (or else $PIP_CERT) names a readable file: needed where TLS to PyPI is
#   intercepted; never stored in the image.
# - --push pushes IMAGE:TAG afterwards (log in to the registry first).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n 1)
IMAGE="authz:${VERSION:-dev}"
BASE=""
PUSH=0
EXTRA=()

while (($#)); do
  case "$1" in
    -t|--tag) IMAGE=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    --push) PUSH=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

ENGINE=${AUTHZ_IMAGE_ENGINE:-}
if [[ -z "$ENGINE" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    ENGINE=docker
  elif command -v podman >/dev/null; then
    ENGINE=podman
  else
    echo "build.sh: neither a running docker daemon nor podman found" >&2
    exit 2
  fi
fi

REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE_URL=${SOURCE_URL:-$(git -C "$ROOT" remote get-url origin 2>/dev/null || true)}

args=(build --file "$ROOT/Dockerfile" --tag "$IMAGE"
      --build-arg "VERSION=${VERSION:-dev}"
      --build-arg "REVISION=$REVISION"
      --build-arg "SOURCE_URL=$SOURCE_URL")
[[ -n "$BASE" ]] && args+=(--build-arg "BASE_IMAGE=$BASE")

PIP_CA=${AUTHZ_PIP_CA:-${PIP_CERT:-}}
[[ -n "$PIP_CA" && -r "$PIP_CA" ]] && args+=(--secret "id=pip_ca,src=$PIP_CA")

if [[ "$ENGINE" == podman ]]; then
  # chroot isolation: RUN steps work in sandboxes without cgroups/rlimits (see
  # tests/image/engines.py). --pull=never with a localhost/ base: nothing to pull from.
  args+=(--isolation=chroot)
  [[ "$BASE" == localhost/* ]] && args+=(--pull=never)
fi

"$ENGINE" "${args[@]}" "${EXTRA[@]}" "$ROOT"

if ((PUSH)); then
  "$ENGINE" push "$IMAGE"
fi
echo "$IMAGE"
