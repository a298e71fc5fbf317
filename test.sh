#!/usr/bin/env bash
# Run the whole test suite. Installs what it needs: Debian packages (as root), .venv.
# Extra arguments go to pytest, e.g. ./test.sh -k websocket
set -euo pipefail
cd "$(dirname "$0")"
scripts/system-packages.sh
scripts/bootstrap.sh local,test
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure." >&2
  exit 1
fi
exit "$status"
