#!/usr/bin/env bash
# System packages that tests and benchmarks start for real, installed from Debian's archive when
# missing. Idempotent: a component already present is left alone, and nothing is upgraded.
#
#   scripts/install-system-deps.sh [component...]     (default: all)
#
# Components:
#   pgbouncer   PgBouncer, the reference pooler bench/pg_gateway.py measures the PG Gateway
#               against (run by the bench itself; Debian's own service is kept stopped, since
#               it would listen on 6432, the PG Gateway's default port).
#   jdbc        PostgreSQL's JDBC driver (/usr/share/java/postgresql.jar) and a JDK to run
#               tests/clients/jdbc/Drivers.java from source (java 11+ runs a source file).
#   nodejs      Node.js and npm, for tests/clients/node (node-postgres).
#   pebble      Let's Encrypt's ACME test CA, which the certificate tests issue from
#               (tests/fixtures/acme.py starts it on loopback; nothing runs as a service).
#   caddy       Caddy, the ingress `make run` and the tests start (libs/launcher.py) and the
#               network service configures through its admin API. Debian's own caddy.service is
#               disabled: it would hold the admin port 2019 and :80 with a Caddyfile.
#   prometheus  Prometheus and promtool, for `make observe` and tests/e2e/test_observe.py
#               (Debian's own service is kept stopped: `make observe` runs its own, on loopback).
#   wrk         wrk, the HTTP load generator of bench/api.py (a C client whose own CPU is small
#               beside the mesh's on a two-core machine).
#   h2load      nghttp2's h2load, bench/api.py's HTTP/2 load generator for the same RPC called
#               directly over gRPC (the edge's cost against it, at the same concurrency).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
APT_UPDATED=""

apt_install() {
  if [ -z "$APT_UPDATED" ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"
}

install_pgbouncer() {
  if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
    return 0
  fi
  echo "installing pgbouncer (Debian package)"
  apt_install pgbouncer
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now pgbouncer >/dev/null 2>&1 || true
  else
    $SUDO service pgbouncer stop >/dev/null 2>&1 || true
  fi
}

install_jdbc() {
  local want=()
  [ -f /usr/share/java/postgresql.jar ] || want+=(libpostgresql-jdbc-java)
  command -v java >/dev/null 2>&1 || want+=(default-jdk-headless)
  if [ ${#want[@]} -eq 0 ]; then return 0; fi
  echo "installing ${want[*]} (Debian packages)"
  apt_install "${want[@]}"
}

install_nodejs() {
  local want=()
  command -v node >/dev/null 2>&1 || want+=(nodejs)
  command -v npm >/dev/null 2>&1 || want+=(npm)
  if [ ${#want[@]} -eq 0 ]; then return 0; fi
  echo "installing ${want[*]} (Debian packages)"
  apt_install "${want[@]}"
}

install_pebble() {
  if command -v pebble >/dev/null 2>&1; then return 0; fi
  echo "installing pebble (Debian package)"
  apt_install pebble
}

install_caddy() {
  if command -v caddy >/dev/null 2>&1 || [ -x /usr/bin/caddy ]; then
    return 0
  fi
  echo "installing caddy (Debian package)"
  apt_install caddy
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now caddy >/dev/null 2>&1 || true
  else
    $SUDO service caddy stop >/dev/null 2>&1 || true
  fi
}

install_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    return 0
  fi
  echo "installing prometheus (Debian package)"
  apt_install prometheus
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  else
    $SUDO service prometheus stop >/dev/null 2>&1 || true
  fi
}

install_wrk() {
  if command -v wrk >/dev/null 2>&1; then return 0; fi
  echo "installing wrk (Debian package)"
  apt_install wrk
}

install_h2load() {
  if command -v h2load >/dev/null 2>&1; then return 0; fi
  echo "installing h2load (Debian package nghttp2-client)"
  apt_install nghttp2-client
}

components=("$@")
if [ ${#components[@]} -eq 0 ]; then components=(pgbouncer jdbc nodejs caddy pebble prometheus wrk h2load); fi
for c in "${components[@]}"; do
  case "$c" in
    pgbouncer) install_pgbouncer ;;
    jdbc) install_jdbc ;;
    nodejs) install_nodejs ;;
    pebble) install_pebble ;;
    caddy) install_caddy ;;
    prometheus) install_prometheus ;;
    wrk) install_wrk ;;
    h2load) install_h2load ;;
    *) echo "unknown component: $c" >&2; exit 2 ;;
  esac
done
