#!/usr/bin/env bash
# Make sure the machine has what scopemeter expects beside its own venv:
#  - the mosquitto binary (Debian package), which `scopemeter stack up` and the tests start on their own ports;
#  - a reachable PostgreSQL on 127.0.0.1:5432 (started the Debian way if installed but stopped);
#  - tools the tests drive for real: openssl (certificates), pdftoppm (statement PDFs to PNG),
#    promtool (alert rule tests, from Debian's prometheus package).
set -euo pipefail

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v pg_isready >/dev/null 2>&1 || need_apt+=(postgresql)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v pdftoppm >/dev/null 2>&1 || need_apt+=(poppler-utils)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${need_apt[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "missing: ${need_apt[*]} — install them with: sudo apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$version" ]; then
    echo "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  pg_isready -q -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }
fi

# A real TimescaleDB (PGlite WASM build, from npm) for the tests of the TimescaleDB storage path:
# installed into ops/timescale/node_modules (gitignored) when missing or older than the lock file.
ts_dir="$(dirname "$0")/timescale"
if [ ! -f "$ts_dir/node_modules/.package-lock.json" ] || [ "$ts_dir/package-lock.json" -nt "$ts_dir/node_modules/.package-lock.json" ]; then
  command -v npm >/dev/null 2>&1 || { echo "missing: node and npm (v20+), needed for ops/timescale" >&2; exit 1; }
  echo "installing the TimescaleDB WASM server into ops/timescale/node_modules"
  (cd "$ts_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi
