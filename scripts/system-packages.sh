#!/usr/bin/env bash
# Install the Debian packages the tests run for real (Redis, nginx, Chromium) when missing.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "Missing ${missing[*]}: install them (Debian: apt-get install ${missing[*]}); the tests need them." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "Installing ${missing[*]} from Debian…" >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Packaged services may start themselves; the tests start their own on free ports.
for service in redis-server nginx; do
  if command -v service >/dev/null; then service "$service" stop >/dev/null 2>&1 || true; fi
done
