#!/usr/bin/env bash
# Installs what the test suite needs beyond the Python package: redis-server, and tools kept in
# their own virtualenvs under .tools/ so they never clash with the service's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
if ((${#need_apt[@]})); then
  echo "installing with apt: ${need_apt[*]}"
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
