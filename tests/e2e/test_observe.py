"""`make observe` for real: Debian's Prometheus, configured by `python -m ops.prometheus` from a
running mesh's settings, scrapes every process; after a small workload (API calls, a database
reached through the PG Gateway, and an instance with a health check when the mesh's Docker
engine answers) every query of every shipped Grafana panel returns a series through
Prometheus's HTTP API.

The session mesh is used as it is: its instances service has an engine only when DOCKER_HOST
was set for the test run (`export DOCKER_HOST=$(bash scripts/docker-up.sh | tail -1)`). The
instances panels have series without one (the gauges cover every provider and state, the
health-check outcomes start at zero), so the test holds on a machine without Docker too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from ops import dashboards, observe
from tests.fixtures.databases import tenant_with_db
from tests.fixtures.instances import create_body, make_tenant, wait_for
from tests.fixtures.mesh import ROOT, Mesh, free_port

pytestmark = pytest.mark.e2e

SCRAPE = "1s"
# What the workload must have moved (not just exported at zero), as read through Prometheus.
ACTIVITY = (
    'sum(ctrlmesh_http_requests_total{job="ctrlmesh-edge",status="401"})',
    'sum(ctrlmesh_grpc_server_requests_total{job="ctrlmesh-accounts",code="NOT_FOUND"})',
    'sum(ctrlmesh_databases_cold_starts_total{outcome="ok"})',
    'sum(ctrlmesh_reconcile_drives_total{job="ctrlmesh-databases"})',
    "sum(pggateway_cold_starts_total)",
    "sum(pggateway_checkouts_total)",
    "sum(pggateway_pins_total)",
    'sum(pggateway_auth_failures_total{reason="password"})',
    "sum(ctrlmesh_periodic_passes_total)",
)
# The same for the instance workload, when the mesh has an engine.
INSTANCE_ACTIVITY = (
    'ctrlmesh_instance_provider_up{provider="docker"}',
    'sum(ctrlmesh_reconcile_drives_total{job="ctrlmesh-instances"})',
    "sum(ctrlmesh_instance_health_checks_total)",
)
# What Grafana puts in place of its own variables, for a query sent straight to Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


@pytest.fixture
def prom(mesh: Mesh) -> Iterator[str]:
    """`make observe` (python -m ops.observe) against `mesh`, scraping every second on a free
    loopback port; the URL it prints. Stopped with Ctrl-C (SIGINT) as an operator would."""
    observe.ensure_installed()
    env = dict(
        mesh.env, CTRLMESH_PROMETHEUS_PORT=str(free_port()), CTRLMESH_PROMETHEUS_SCRAPE_INTERVAL=SCRAPE
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.observe"], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (lines and lines[-1].startswith("Press Ctrl-C")):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        url = next((ln.split()[1] for ln in lines if ln.strip().startswith("URL:")), None)
        assert url is not None and url.startswith("http://127.0.0.1:"), "".join(lines)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0 and "Prometheus stopped" in out, "".join(lines) + out
    # Its time series live under the mesh's data directory.
    assert any((mesh.data_dir / "prometheus" / "data").iterdir())


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, f"{expr}: {r.text}"
    body = r.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _substitute(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):  # $__rate_interval before $__range
        expr = expr.replace(name, variables[name])
    return expr


def _panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, query) for every target of every shipped dashboard file, with the
    template variables as Grafana would fill them (All → the variable's allValue)."""
    out = []
    for path in sorted(dashboards.OUT.glob("*.json")):
        d = json.loads(path.read_text())
        variables = dict(GRAFANA_VARIABLES)
        for v in d["templating"]["list"]:
            if v["type"] == "query":
                variables[f"${v['name']}"] = v["allValue"]
        for p in d["panels"]:
            for t in p["targets"]:
                expr = _substitute(t["expr"], variables)
                assert "$" not in expr, f"a variable left in {d['title']} / {p['title']}: {expr}"
                out.append((d["title"], p["title"], expr))
    return out


def _variable_values(url: str) -> dict[str, list[str]]:
    """Each query variable's values as Grafana's `label_values(selector, label)` asks for them."""
    import re

    out = {}
    for path in sorted(dashboards.OUT.glob("*.json")):
        for v in json.loads(path.read_text())["templating"]["list"]:
            if v["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["definition"])
            assert m, v["definition"]
            r = httpx.get(
                f"{url}/api/v1/label/{m.group(2)}/values", params={"match[]": m.group(1)}, timeout=10
            )
            assert r.status_code == 200, r.text
            out[f"{path.stem} ${v['name']}"] = list(r.json()["data"])
    return out


def _workload(mesh: Mesh) -> bool:
    """A little of everything the dashboards show; True when it included an instance."""
    admin = mesh.admin()
    assert admin.get("/v2/tenants").status_code == 200
    assert admin.get("/v2/tenants/no-such-tenant").status_code == 404  # a gRPC NOT_FOUND
    assert mesh.client().get("/v2/tenants").status_code == 401
    # A database: created (a cold start), reached through the PG Gateway with a pinning SET and
    # pooled transactions, and a refused login.
    t = tenant_with_db(mesh)
    dsn = f"postgresql://{t.pg_user}:{t.pg_password}@localhost:{mesh.env['CTRLMESH_PG_PORT']}/app?sslmode=require"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
        for _ in range(5):
            assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.execute("SET application_name = 'observe-test'")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn.replace(t.pg_password, "wrong"), connect_timeout=10)
    providers = admin.get("/v1/admin/providers").json()["items"]
    if not any(p["name"] == "docker" and p["healthy"] for p in providers):
        return False
    _instance_workload(mesh)
    return True


def _instance_workload(mesh: Mesh) -> None:
    """An instance on the engine (reconcile drives) and, once it runs, a health check every second."""
    tenant = make_tenant(mesh, {"max_instances": 2, "max_cpu_millis": 2000, "max_memory_mb": 1024})
    c = tenant.client()
    r = c.post("/v1/instances", json=create_body())
    assert r.status_code == 201, r.text
    iid = r.json()["id"]
    try:
        # `failed` (an image the engine lacks, an engine that cannot start it) drives the reconcile too.
        inst = wait_for(
            lambda: c.get(f"/v1/instances/{iid}").json(), lambda i: i["state"] in ("running", "failed")
        )
        if inst["state"] == "running":
            check = {
                "name": "tcp",
                "type": "tcp",
                "target": "localhost:8080",
                "interval": "1s",
                "timeout": "1s",
            }
            assert c.post(f"/v1/instances/{iid}/health/checks", json=check).status_code == 201
            wait_for(
                lambda: c.get(f"/v1/instances/{iid}/health").json(),
                lambda h: any(x.get("last_result") for x in h["checks"]),
                timeout=15,
            )
    finally:
        assert c.delete(f"/v1/instances/{iid}").status_code in (202, 404)
        wait_for(lambda: c.get(f"/v1/instances/{iid}").status_code, lambda code: code == 404)


# The session mesh may be started for this test alone (about 30 s of it, more on a busy machine).
@pytest.mark.timeout(180)
def test_every_target_is_up_and_every_panel_returns_a_series(mesh, prom):
    """Every process of the mesh is scraped and up; every dashboard panel's query has data."""
    want = 5 + 1 + int(mesh.env["CTRLMESH_PG_WORKERS"])  # services, the edge, gateway workers

    def active() -> list[dict[str, Any]]:
        return list(httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"])

    up = wait_for(active, lambda ts: len(ts) == want and all(t["health"] == "up" for t in ts), timeout=20)
    assert {t["labels"]["job"] for t in up} == set(_jobs(mesh))
    rules = httpx.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
    assert sum(len(g["rules"]) for g in rules) >= 10

    with_instance = _workload(mesh)
    time.sleep(3)  # a few scrapes after the last request, so every rate has two samples

    for expr in ACTIVITY + (INSTANCE_ACTIVITY if with_instance else ()):
        result = _query(prom, expr)
        assert result and float(result[0]["value"][1]) > 0, f"the workload did not show in {expr}: {result}"

    variables = _variable_values(prom)
    assert variables and all(variables.values()), variables

    queries = _panel_queries()
    assert len(queries) >= 40
    empty, pending = [], []
    for board, panel, expr in queries:
        result = _query(prom, expr)
        if os.environ.get("CTRLMESH_OBSERVE_DEBUG"):
            values = [r["value"][1] for r in result]
            sys.stderr.write(f"{len(result)} series {values[:4]} {board} / {panel}: {expr}\n")
        if result:
            continue
        if any(name in expr for name in dashboards.PENDING):
            pending.append(expr)  # a metric another part of the platform will export
            continue
        empty.append(f"{board} / {panel}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert len(pending) <= len(dashboards.PENDING), pending


def _jobs(mesh: Mesh) -> list[str]:
    """The jobs `ops.prometheus` derives from this mesh's settings (read in the mesh's environment)."""
    code = "from libs.settings import Settings; from ops.prometheus import targets; print(*targets(Settings.load()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=mesh.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.split()
