#!/usr/bin/env bash
# Prepares a fresh machine for `make run` / `make test`: the virtual environment, the Python
# dependencies declared in pyproject.toml, the generated protobuf stubs, and the system
# packages the mesh itself runs (Caddy, the ingress). Idempotent and quick
# when nothing changed (a stamp of pyproject.toml skips pip).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

stamp=.venv/.ctrlmesh-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python scripts/deps.py > .venv/requirements.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check -r .venv/requirements.txt
  echo "$want" > "$stamp"
fi

.venv/bin/python scripts/genproto.py
bash scripts/install-system-deps.sh caddy
