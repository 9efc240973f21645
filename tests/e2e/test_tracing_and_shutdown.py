"""One REST call is one trace across processes, and Ctrl-C leaves no process behind."""

import signal
import time

import pytest

from tests.fixtures.api import unique
from tests.fixtures.mesh import still_running
from tests.fixtures.otlp import Collector

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def traced(module_mesh_builder):
    """A private mesh exporting traces to an in-test OTLP collector."""
    collector = Collector()
    m = module_mesh_builder(**collector.start())
    yield m, collector
    collector.stop()


def test_one_rest_call_is_one_trace_edge_accounts_sql(traced):
    """GET /v2/tenants/{t} yields one trace: edge HTTP span → edge gRPC client → accounts server → SQL."""
    mesh, collector = traced
    name = unique("tr")
    assert mesh.admin().post("/v2/tenants", json={"name": name}).status_code == 201
    assert mesh.admin().get(f"/v2/tenants/{name}").status_code == 200
    deadline = time.monotonic() + 15
    trace_id = None
    while time.monotonic() < deadline:
        http = [
            s
            for svc, s in collector.spans
            if svc == "ctrlmesh-edge"
            and any(
                a.key == "ctrlmesh.route" and a.value.string_value == "GET /v2/tenants/{tenant}"
                for a in s.attributes
            )
        ]
        if http:
            trace_id = http[0].trace_id
            in_trace = [(svc, s) for svc, s in collector.spans if s.trace_id == trace_id]
            services = {svc for svc, _ in in_trace}
            if {"ctrlmesh-edge", "ctrlmesh-accounts", "ctrlmesh-databases"} <= services and any(
                any(a.key == "db.system" for a in s.attributes) for _, s in in_trace
            ):
                break
        time.sleep(0.2)
    assert trace_id is not None, "the edge exported no span for the request"
    in_trace = [(svc, s) for svc, s in collector.spans if s.trace_id == trace_id]
    by_id = {s.span_id: (svc, s) for svc, s in in_trace}
    servers = [
        s for svc, s in in_trace if svc == "ctrlmesh-accounts" and s.name.endswith("TenantService/GetTenant")
    ]
    assert servers, sorted({(svc, s.name) for svc, s in in_trace})
    # The accounts server span's parent is the edge's gRPC client span, in the edge process.
    parent_svc, parent = by_id[servers[0].parent_span_id]
    assert parent_svc == "ctrlmesh-edge" and parent.kind == parent.SPAN_KIND_CLIENT
    # SQL spans of accounts sit inside the same trace; so does accounts' call to databases (db_count).
    sql = [
        s
        for svc, s in in_trace
        if svc == "ctrlmesh-accounts" and any(a.key == "db.system" for a in s.attributes)
    ]
    assert sql and all(s.trace_id == trace_id for s in sql)
    assert any(svc == "ctrlmesh-databases" for svc, _ in in_trace)


def test_sigint_stops_every_process(traced):
    """Ctrl-C (SIGINT) to the launcher stops the services, the edge and PostgreSQL: no process is left."""
    mesh, _ = traced
    pids = mesh.pids()
    assert len(pids) >= 7  # five services, the edge, PostgreSQL
    assert mesh.stop(signal.SIGINT) == 0
    assert still_running(pids) == []
