# The two commands a newcomer needs: `make run` and `make test`. Both bootstrap themselves.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR):$(CURDIR)/gen

.PHONY: run test bootstrap proto lint typecheck routes openapi bench clean admin-key observe handoff

bootstrap:
	@bash scripts/bootstrap.sh

proto: bootstrap

run: bootstrap
	@$(PY) -m libs.launcher

# A real Prometheus (on loopback) scraping the mesh `make run` runs; prints its URL. Dashboards: ops/grafana.
observe: bootstrap
	@$(PY) -m ops.observe

# Break-glass: a new global API key written straight into the control-plane database (printed once).
admin-key: bootstrap
	@$(PY) -m libs.admin_key

# Ask the running platform for a writer profile handoff: make handoff DB=<db_id> PROFILE=L2
handoff: bootstrap
	@$(PY) -m services.databases.handoff_cli "$(DB)" "$(PROFILE)"

test: bootstrap
	@$(PY) -m pytest tests --durations=25

lint: bootstrap
	@.venv/bin/ruff check . && .venv/bin/ruff format --check .

typecheck: bootstrap
	@.venv/bin/mypy libs services gateway pggateway ops

routes: bootstrap
	@$(PY) -m gateway.routes_report

openapi: bootstrap
	@$(PY) -m gateway.openapi > openapi.json

# Benchmarks write bench/results/*.json and their table into README.md (several minutes).
bench: bootstrap
	@$(PY) bench/cold_start.py && $(PY) bench/pg_gateway.py
	@DOCKER_HOST=$$(bash scripts/docker-up.sh) $(PY) bench/instances.py
	@$(PY) bench/api.py

clean:
	rm -rf gen .venv
