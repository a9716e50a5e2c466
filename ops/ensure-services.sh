#!/usr/bin/env bash
# Make sure the machine has what scopemeter expects beside its own venv. On a fresh Debian machine
# (no service running) this installs and starts everything `make demo` and `make test` use:
#  - Debian packages: mosquitto (started by `scopemeter stack up` / the tests on their own ports),
#    postgresql, openssl (certificates), poppler-utils (statement PDFs to PNG), prometheus (promtool
#    for the alert rule tests), a Java 17 runtime and Maven (Apache Kafka, fetched by ops/kafka/pom.xml);
#  - the local PostgreSQL cluster on 127.0.0.1:5432, started the Debian way, with the role
#    `scopemeter` (password `scopemeter`, CREATEDB) that the default DSN uses: Debian's own
#    pg_hba.conf (scram-sha-256 on loopback) is left as it is;
#  - Apache Kafka's jars in the cache (ops/kafka/fetch.sh);
#  - the TimescaleDB WASM test server's npm packages (ops/timescale/).
# Without root it installs nothing and prints the commands to run instead.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v pdftoppm >/dev/null 2>&1 || need_apt+=(poppler-utils)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
# javac: tests/test_sparkplug_templates.py compiles its Eclipse Tahu edge node (tests/sparkplug_tahu/).
command -v javac >/dev/null 2>&1 || need_apt+=(openjdk-17-jdk-headless)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${need_apt[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "missing: ${need_apt[*]} — install them with: sudo apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
fi

# --- PostgreSQL -----------------------------------------------------------------------------------
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -n -u postgres "$@"; fi
}
version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
# The local cluster serves this machine only (no standby streams from it), so it keeps the least
# WAL: with wal_level = minimal, COPY into a table TRUNCATEd in the same transaction and the keys
# built afterwards are not WAL-logged (PostgreSQL 15 manual, 20.5.1 wal_level and wal_skip_threshold;
# 14.4.7 "Disable WAL Archival and Streaming Replication"), which is how
# `scopemeter compute rebuild` rewrites its tables. The price: no streaming replication or WAL
# archiving from this cluster (delete the file and restart to get them back); a server left at
# wal_level = replica runs everything the same, only the rebuild's writes are slower.
wal_conf="/etc/postgresql/$version/main/conf.d/50-scopemeter-wal.conf"
if [ -n "$version" ] && [ -d "$(dirname "$wal_conf")" ] && [ ! -f "$wal_conf" ]; then
  if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
    echo "writing $wal_conf (wal_level = minimal, max_wal_senders = 0)"
    printf '%s\n' "# written by scopemeter ops/ensure-services.sh: a local cluster with no standby" \
      "wal_level = minimal" "max_wal_senders = 0" | \
      if [ "$(id -u)" = 0 ]; then tee "$wal_conf" >/dev/null; else sudo -n tee "$wal_conf" >/dev/null; fi
  else
    echo "note: as root, write wal_level = minimal and max_wal_senders = 0 to $wal_conf (faster rebuilds)" >&2
  fi
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if [ -z "$version" ]; then
    echo "PostgreSQL is installed but has no cluster; create one with: sudo pg_createcluster --start 15 main" >&2
    exit 1
  fi
  echo "starting PostgreSQL $version/main"
  if [ "$(id -u)" = 0 ]; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  else
    sudo -n pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  pg_isready -q -h 127.0.0.1 -p 5432 || {
    echo "PostgreSQL is not reachable on 127.0.0.1:5432; start it with: sudo pg_ctlcluster $version main start" >&2
    exit 1
  }
fi
# A cluster that was running before the file was written keeps its WAL level until restarted; it
# is not restarted here (other clients may be connected).
if [ -f "$wal_conf" ] && [ "$(PGPASSWORD=scopemeter psql -qAt -h 127.0.0.1 -U scopemeter -d postgres \
      -c 'show wal_level' 2>/dev/null || true)" = replica ]; then
  echo "note: PostgreSQL runs with wal_level = replica; restart it to apply $wal_conf:" \
       "sudo pg_ctlcluster $version main restart" >&2
fi
# The project's role: created once, idempotently. Skipped when the default DSN already connects
# (someone configured it by hand) or SCOPEMETER_DB__ADMIN_DSN points elsewhere.
if [ -z "${SCOPEMETER_DB__ADMIN_DSN:-}" ] && \
   ! PGPASSWORD=scopemeter psql -qAt -h 127.0.0.1 -U scopemeter -d postgres -c 'select 1' >/dev/null 2>&1; then
  echo "creating the PostgreSQL role scopemeter (CREATEDB, password scopemeter)"
  as_postgres psql -q -v ON_ERROR_STOP=1 -d postgres <<'SQL' || {
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'scopemeter') THEN
    CREATE ROLE scopemeter LOGIN CREATEDB PASSWORD 'scopemeter';
  ELSE
    ALTER ROLE scopemeter LOGIN CREATEDB PASSWORD 'scopemeter';
  END IF;
END $$;
SQL
    echo "cannot create the role; run as the postgres user: CREATE ROLE scopemeter LOGIN CREATEDB PASSWORD 'scopemeter'" >&2
    exit 1
  }
fi

# --- Apache Kafka ---------------------------------------------------------------------------------
if [ -x "$here/kafka/fetch.sh" ] || [ -f "$here/kafka/fetch.sh" ]; then
  bash "$here/kafka/fetch.sh" >/dev/null
fi

# --- TimescaleDB (WASM) for the tests of the TimescaleDB storage path -----------------------------
# Installed into ops/timescale/node_modules (gitignored) when missing or older than the lock file.
ts_dir="$here/timescale"
if [ ! -f "$ts_dir/node_modules/.package-lock.json" ] || [ "$ts_dir/package-lock.json" -nt "$ts_dir/node_modules/.package-lock.json" ]; then
  command -v npm >/dev/null 2>&1 || { echo "missing: node and npm (v20+), needed for ops/timescale" >&2; exit 1; }
  echo "installing the TimescaleDB WASM server into ops/timescale/node_modules"
  (cd "$ts_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi
