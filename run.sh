#!/usr/bin/env bash
# Start chatgate with the web UI on http://127.0.0.1:8000: Ollama when OLLAMA_HOST is set or
# one answers at its default address, else the embedded model. Extra arguments go to
# `chatgate serve`, e.g. ./run.sh --port 9000
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh local
exec .venv/bin/chatgate serve "$@"
