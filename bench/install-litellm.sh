#!/usr/bin/env bash
# Put the LiteLLM proxy in its own virtualenv, bench/.litellm-venv, so the benchmark can run
# it side by side with chatgate without either one's dependencies touching the other's.
# PyPI only. Re-running upgrades nothing unless you delete the folder first.
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
if [ -x .litellm-venv/bin/litellm ]; then
  echo "LiteLLM is already installed in bench/.litellm-venv" >&2
  exit 0
fi
"$python" -m venv .litellm-venv
.litellm-venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.litellm-venv/bin/python -m pip install -q --disable-pip-version-check 'litellm[proxy]'
.litellm-venv/bin/litellm --version
