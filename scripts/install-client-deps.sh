#!/usr/bin/env bash
# The PostgreSQL drivers tests/e2e/test_pg_drivers.py runs that are not Python packages: the JDBC
# driver and a JDK (Debian packages), and node-postgres (npm, pinned by the committed
# tests/clients/node/package-lock.json). Idempotent and quick when nothing changed: `npm ci` runs
# only when the lock file differs from the one the installed node_modules was made from. The test
# fixture runs it, so `make run` never pays for it.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh jdbc nodejs

node_dir=tests/clients/node
stamp=$node_dir/node_modules/.ctrlmesh-lock
want=$(sha256sum "$node_dir/package-lock.json" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$stamp"
fi
