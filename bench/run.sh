#!/usr/bin/env bash
# Run the benchmark from a fresh clone: make .venv (chatgate plus the bench extra, matplotlib),
# then bench/run.py with the given options, e.g. ./bench/run.sh --quick
# LiteLLM joins the comparison when bench/install-litellm.sh has been run once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh bench
exec .venv/bin/python bench/run.py "$@"
