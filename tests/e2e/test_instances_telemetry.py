"""Instance telemetry end to end: an instance's OTEL_* environment is read from the engine, the
OpenTelemetry SDK exports spans and metrics where it says with the headers it gives, and /v1
returns exactly those through the edge (metrics, traces, dashboard, resource history), scoped
to the tenant; another instance's token cannot write into it."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from tests.fixtures.docker import engine_containers
from tests.fixtures.instances import V2, create_running, destroy, make_tenant, wait_deployment, wait_for
from tests.fixtures.mesh import Mesh

# The timeout covers the session mesh's start when this module runs first (a minute on a loaded machine).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def injected_env(docker_host: str, instance_id: str) -> dict[str, str]:
    """The environment the engine runs the instance's container with (docker inspect)."""
    [name] = engine_containers(docker_host, instance_id)
    out = subprocess.run(
        ["docker", "inspect", name],
        capture_output=True,
        text=True,
        check=True,
        env={"DOCKER_HOST": docker_host, "PATH": "/usr/local/bin:/usr/bin:/bin"},
        timeout=20,
    ).stdout
    return dict(kv.split("=", 1) for kv in json.loads(out)[0]["Config"]["Env"])


def headers(env: dict[str, str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in env["OTEL_EXPORTER_OTLP_HEADERS"].split(","))


def resource(env: dict[str, str], **extra: str) -> Resource:
    attrs = dict(kv.split("=", 1) for kv in env["OTEL_RESOURCE_ATTRIBUTES"].split(","))
    return Resource.create({**attrs, "service.name": env["OTEL_SERVICE_NAME"], **extra})


def make_spans(res: Resource) -> list[ReadableSpan]:
    mem = InMemorySpanExporter()
    provider = TracerProvider(resource=res)
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("web")
    with tracer.start_as_current_span("GET /", kind=SpanKind.SERVER):
        with tracer.start_as_current_span("render", attributes={"items": 2}):
            time.sleep(0.02)
    with tracer.start_as_current_span("GET /fail", kind=SpanKind.SERVER) as sp:
        sp.set_status(Status(StatusCode.ERROR, "no"))
    provider.shutdown()
    return list(mem.get_finished_spans())


def test_an_instance_exports_with_its_injected_env_and_reads_it_back(imesh: Mesh, docker_host: str) -> None:
    """The OTEL_* variables on the engine name a receiver that takes the SDK's spans (HTTP and
    gRPC) and metrics; /traces, /metrics (raw and stepped), /dashboard and /resources?since=
    return them through the edge; another tenant gets 404; a token of A claiming B writes to A."""
    a, b = make_tenant(imesh), make_tenant(imesh)
    ca, cb = a.client(), b.client()
    ia, ib = create_running(ca), create_running(cb)
    env = injected_env(docker_host, ia["id"])
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://127.0.0.1:{imesh.env['CTRLMESH_OTLP_HTTP_PORT']}"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf" and env["GREETING"] == "hello"
    assert f"ctrlmesh.instance.id={ia['id']}" in env["OTEL_RESOURCE_ATTRIBUTES"]
    assert f"ctrlmesh.release.id={ia['current_release']}" in env["OTEL_RESOURCE_ATTRIBUTES"]
    assert "otlp_" not in json.dumps(ca.get(f"/v1/instances/{ia['id']}").json())  # the token is not shown

    # The dashboard before any span: rates and latencies are null, not zero.
    dash = ca.get(f"/v1/instances/{ia['id']}/dashboard").json()
    assert (
        dash["request_rate_per_sec"] is None and dash["avg_latency"] is None and dash["p99_latency"] is None
    )

    spans = make_spans(resource(env))
    base = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert (
        OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=headers(env)).export(spans[:2]).name
        == "SUCCESS"
    )
    grpc_target = f"127.0.0.1:{imesh.env['CTRLMESH_OTLP_GRPC_PORT']}"
    g = GrpcSpanExporter(endpoint=grpc_target, insecure=True, headers=headers(env))
    assert g.export(spans[2:]).name == "SUCCESS"
    reader = InMemoryMetricReader()
    meter = MeterProvider(resource=resource(env), metric_readers=[reader]).get_meter("web")
    meter.create_counter("requests").add(7, {"route": "/"})
    meter.create_histogram("duration", unit="ms").record(40)
    data = reader.get_metrics_data()
    assert (
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=headers(env)).export(data).name == "SUCCESS"
    )

    # A's token with a resource claiming B's instance: stored under A, nothing in B.
    forged = make_spans(resource(env, **{"ctrlmesh.instance.id": ib["id"], "ctrlmesh.tenant.id": b.id}))
    assert (
        OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=headers(env)).export(forged).name == "SUCCESS"
    )

    r = ca.get(f"/v1/instances/{ia['id']}/traces", params={"limit": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 4 and {t["root_operation"] for t in body["traces"]} == {"GET /", "GET /fail"}
    sent = {f"{s.context.span_id:016x}": s for s in spans + forged}
    assert {x["span_id"] for x in body["items"]} == set(sent)
    for x in body["items"]:
        s = sent[x["span_id"]]
        assert x["trace_id"] == f"{s.context.trace_id:032x}" and x["operation"] == s.name
        assert x["instance_id"] == ia["id"] and x["resource"]["ctrlmesh.instance.id"] == ia["id"]
    render = next(x for x in body["items"] if x["operation"] == "render")
    assert render["attributes"] == {"items": 2} and render["kind"] == "internal"
    assert float(render["duration"].rstrip("s")) >= 0.02
    fail = next(x for x in body["items"] if x["operation"] == "GET /fail")
    assert fail["status"] == "error" and fail["kind"] == "server"
    one = ca.get(f"/v1/instances/{ia['id']}/traces", params={"trace_id": render["trace_id"]}).json()
    assert {x["operation"] for x in one["items"]} == {"GET /", "render"} and one["total"] == 1
    slow = ca.get(f"/v1/instances/{ia['id']}/traces", params={"min_duration": "0.015s"}).json()
    assert {t["root_operation"] for t in slow["traces"]} == {"GET /"}
    assert cb.get(f"/v1/instances/{ib['id']}/traces").json().get("items", []) == []

    m = ca.get(f"/v1/instances/{ia['id']}/metrics", params={"name": "requests"}).json()
    [pt] = m["items"]
    assert (pt["type"], pt["value"], pt["labels"]) == ("counter", 7.0, {"route": "/"})
    h = ca.get(f"/v1/instances/{ia['id']}/metrics", params={"name": "duration", "step": "60s"}).json()
    [hp] = h["items"]
    assert (
        hp["type"] == "histogram"
        and hp["count"] == 1
        and hp["value"] == 40.0
        and sum(hp["bucket_counts"]) == 1
    )
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert len(ca.get(f"/v1/instances/{ia['id']}/metrics", params={"since": since}).json()["items"]) == 2

    dash = ca.get(f"/v1/instances/{ia['id']}/dashboard").json()
    assert dash["request_rate_per_sec"] == pytest.approx(4 / 300, rel=0.01)
    assert dash["error_rate_per_sec"] == pytest.approx(2 / 300, rel=0.01)
    assert dash["avg_latency"] is not None and dash["p99_latency"] is not None
    assert dash["recent_deploys_24h"] >= 0 and dash["active_alerts"] == 0

    res: Any = wait_for(
        lambda: ca.get(f"/v1/instances/{ia['id']}/resources", params={"since": since}).json(),
        lambda x: len(x.get("history") or []) >= 2,
        timeout=20,
    )
    assert all(s["instance_id"] == ia["id"] for s in res["history"])
    assert res["history"][0]["timestamp"] <= res["history"][-1]["timestamp"]

    for suffix, params in (
        ("metrics", {"step": "0s"}),
        ("metrics", {"step": "99999999s"}),
        ("traces", {"trace_id": "not-hex"}),
        ("traces", {"min_duration": "-1s"}),
        ("traces", {"limit": 5000}),
    ):
        assert ca.get(f"/v1/instances/{ia['id']}/{suffix}", params=params).status_code == 400, params
    for suffix in ("/metrics", "/traces", "/dashboard", "/resources"):
        assert cb.get(f"/v1/instances/{ia['id']}{suffix}").status_code == 404, suffix
    destroy(ca, docker_host, ia["id"])
    destroy(cb, docker_host, ib["id"])


def test_a_redeploy_injects_a_fresh_token_and_retires_old_ones(imesh: Mesh, docker_host: str) -> None:
    """Each deployment starts its containers with a new token and its own release in the
    resource attributes; the previous release's token still exports (its replicas may still be
    draining), the one before that is refused with 401; the instance's env shows no token."""
    t = make_tenant(imesh)
    c = t.client()
    inst = create_running(c)
    iid = inst["id"]
    tokens = [headers(injected_env(docker_host, iid))["x-ctrlmesh-otlp-token"]]
    for greeting in ("two", "three"):
        r = c.post(f"/v1/instances/{iid}/deploy", json={"image": V2, "env": {"GREETING": greeting}})
        assert r.status_code == 201, r.text
        dep = wait_deployment(c, r.json()["id"], ("succeeded", "failed"))
        assert dep["state"] == "succeeded", dep
        env = injected_env(docker_host, iid)
        assert env["GREETING"] == greeting
        assert f"ctrlmesh.release.id={dep['release_id']}" in env["OTEL_RESOURCE_ATTRIBUTES"]
        tokens.append(headers(env)["x-ctrlmesh-otlp-token"])
    assert len(set(tokens)) == 3
    assert c.get(f"/v1/instances/{iid}").json()["env"] == {"GREETING": "three"}
    url = f"{env['OTEL_EXPORTER_OTLP_ENDPOINT']}/v1/traces"
    codes = []
    for token in tokens:
        # The receiver caches a token's answer for a few seconds: wait out a cached "valid".
        r = wait_for(
            lambda token=token: (
                httpx.post(
                    url,
                    content=b"",
                    headers={"content-type": "application/x-protobuf", "x-ctrlmesh-otlp-token": token},
                ).status_code
            ),
            lambda code, first=token == tokens[0]: code == (401 if first else 200),
            timeout=10,
        )
        codes.append(r)
    assert codes == [401, 200, 200]
    destroy(c, docker_host, iid)
