"""One REST call is one trace across processes, and Ctrl-C leaves no process behind."""

import os
import signal
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.fixtures.api import unique
from tests.fixtures.mesh import free_block

pytestmark = pytest.mark.e2e


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC receiver: keeps every span with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []

    def Export(self, request, context):
        for rs in request.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.append((service, span))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def traced(mesh_builder):
    """A private mesh exporting traces to an in-test OTLP collector."""
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_block(1)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    m = mesh_builder(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    yield m, collector
    server.stop(0)


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
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    assert alive == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped by our PID 1) is not a running process.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
