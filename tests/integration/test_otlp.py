"""The OTLP receiver of app instances against a real PostgreSQL, fed by the OpenTelemetry SDK's
own exporters (HTTP and gRPC) with the environment a rollout hands an instance: what is sent
is what the queries return, a token writes only into its own instance, bad and oversized
payloads and over-quota senders are refused the OTLP way, and retention drops old partitions."""

from __future__ import annotations

import asyncio
import base64
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import text

from libs.db import Database, make_engine, migrate
from libs.settings import Settings
from services.instances.otlp import Telemetry, decode
from services.instances.otlp.ingest import RateLimiter
from services.instances.otlp.store import Store
from tests.fixtures.mesh import free_block

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "instances" / "migrations"
WIDE = timedelta(hours=1)


@dataclass
class App:
    """An instance as its rollout left it: its row and the OTEL_* environment it was given."""

    id: str
    tenant_id: str
    env: dict[str, str]

    @property
    def headers(self) -> dict[str, str]:
        k, v = self.env["OTEL_EXPORTER_OTLP_HEADERS"].split("=", 1)
        return {k: v}

    @property
    def resource(self) -> Resource:
        attrs = dict(kv.split("=", 1) for kv in self.env["OTEL_RESOURCE_ATTRIBUTES"].split(",") if kv)
        return Resource.create({**attrs, "service.name": self.env["OTEL_SERVICE_NAME"]})


@dataclass(frozen=True)
class Inst:
    id: str
    tenant_id: str
    slug: str


@pytest.fixture(scope="module")
async def tele(database_url: str) -> AsyncIterator[Telemetry]:
    db = Database(make_engine(database_url, pool_size=4))
    await migrate(db.engine, "instances", MIGRATIONS)
    port = free_block(2)
    t = Telemetry(
        db,
        Settings(
            otlp_grpc_port=port,
            otlp_http_port=port + 1,
            otlp_rate_limit=1000,
            otlp_rate_burst=1000,
            otlp_max_body_bytes=256 * 1024,
        ),
    )
    task = asyncio.create_task(t.receiver.run())
    await asyncio.sleep(0.3)
    yield t
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await db.dispose()


async def make_app(t: Telemetry, name: str, tenant: str = "ten_a") -> App:
    inst = Inst(f"inst_{name}", tenant, name)
    now = datetime.now(UTC)
    async with t.store.db.session() as s:
        await s.execute(
            text(
                "INSERT INTO instances.instances (id, tenant_id, name, slug, provider_name, state, created_at, "
                "updated_at) VALUES (:id, :t, :n, :n, 'docker', 'running', :now, :now)"
            ),
            {"id": inst.id, "t": tenant, "n": name, "now": now},
        )
    [svc] = await t.rollout_env(inst, "rel_1", [{"name": "web", "env": {"GREETING": "hi"}}])
    assert svc["env"]["GREETING"] == "hi"
    return App(inst.id, tenant, svc["env"])


def sdk_spans(app: App) -> list[ReadableSpan]:
    mem = InMemorySpanExporter()
    provider = TracerProvider(resource=app.resource)
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("shop")
    with tracer.start_as_current_span("GET /cart", kind=SpanKind.SERVER, attributes={"http.route": "/cart"}):
        with tracer.start_as_current_span("SELECT carts", kind=SpanKind.CLIENT, attributes={"db.rows": 3}):
            pass
    with tracer.start_as_current_span("GET /boom", kind=SpanKind.SERVER) as sp:
        sp.set_status(Status(StatusCode.ERROR, "boom"))
    provider.shutdown()
    return list(mem.get_finished_spans())


def sdk_metrics(app: App) -> Any:
    reader = InMemoryMetricReader()
    meter = MeterProvider(resource=app.resource, metric_readers=[reader]).get_meter("shop")
    meter.create_counter("orders", unit="1").add(5, {"region": "eu"})
    meter.create_histogram("latency", unit="ms").record(12.0)
    meter.create_histogram("latency", unit="ms").record(700.0)
    meter.create_up_down_counter("queue_depth").add(-2)
    return reader.get_metrics_data()


async def test_sdk_exports_over_http_and_grpc_come_back_exactly(tele: Telemetry) -> None:
    """Spans and metrics exported by the SDK (HTTP with the rollout's endpoint and headers, and
    gRPC) are stored under the token's instance and returned by the queries as sent."""
    app = await make_app(tele, "shop")
    assert app.env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://127.0.0.1:{tele.receiver.http_port}"
    base = app.env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    spans = sdk_spans(app)
    http = HttpSpanExporter(endpoint=f"{base}/v1/traces", headers=app.headers)
    assert (await asyncio.to_thread(http.export, spans[:2])).name == "SUCCESS"
    g = GrpcSpanExporter(endpoint=f"127.0.0.1:{tele.receiver.grpc_port}", insecure=True, headers=app.headers)
    assert (await asyncio.to_thread(g.export, spans[2:])).name == "SUCCESS"

    since = datetime.now(UTC) - WIDE
    groups = await tele.queries.traces(app.id, since=since, trace_id="", min_duration=None, limit=10)
    got = {sp.span_id: sp for gr in groups for sp in gr.spans}
    assert set(got) == {f"{s.context.span_id:016x}" for s in spans}
    for s in spans:
        sp = got[f"{s.context.span_id:016x}"]
        assert sp.trace_id == f"{s.context.trace_id:032x}" and sp.name == s.name
        assert sp.duration_ns == (s.end_time or 0) - (s.start_time or 0)
        assert sp.resource["ctrlmesh.instance.id"] == app.id and sp.resource["service.name"] == "shop"
    assert got[f"{spans[0].context.span_id:016x}"].attributes == {"db.rows": 3}
    assert {gr.root_name for gr in groups} == {"GET /cart", "GET /boom"}
    [cart] = [gr for gr in groups if gr.root_name == "GET /cart"]
    assert [sp.name for sp in cart.spans] == ["GET /cart", "SELECT carts"]
    [boom] = [gr.spans[0] for gr in groups if gr.root_name == "GET /boom"]
    assert boom.kind == "server" and boom.status == "error" and boom.status_message == "boom"
    one = await tele.queries.traces(app.id, since=since, trace_id=cart.trace_id, min_duration=None, limit=10)
    assert [gr.trace_id for gr in one] == [cart.trace_id]

    red = await tele.queries.red(
        app.id, since=datetime.now(UTC) - timedelta(minutes=5), until=datetime.now(UTC)
    )
    assert red.requests == 2 and red.error_rate_per_sec == pytest.approx(1 / 300, rel=0.01)

    data = sdk_metrics(app)
    hm = HttpMetricExporter(endpoint=f"{base}/v1/metrics", headers=app.headers)
    assert (await asyncio.to_thread(hm.export, data)).name == "SUCCESS"
    gm = GrpcMetricExporter(
        endpoint=f"127.0.0.1:{tele.receiver.grpc_port}", insecure=True, headers=app.headers
    )
    assert (await asyncio.to_thread(gm.export, data)).name == "SUCCESS"
    pts = await tele.queries.metrics(
        app.id, name="", since=since, until=datetime.now(UTC) + WIDE, step=None, limit=100
    )
    by: dict[str, list[Any]] = {}
    for p in pts:
        by.setdefault(p.name, []).append(p)
    assert {k: len(v) for k, v in by.items()} == {"orders": 2, "latency": 2, "queue_depth": 2}
    orders = by["orders"][0]
    assert (orders.type, orders.monotonic, orders.value, orders.attributes) == (
        "sum",
        True,
        5.0,
        {"region": "eu"},
    )
    lat = by["latency"][0]
    assert lat.type == "histogram" and lat.count == 2 and lat.value == 712.0 and lat.unit == "ms"
    assert sum(lat.bucket_counts) == 2 and len(lat.bucket_counts) == len(lat.bounds) + 1
    assert by["queue_depth"][0].value == -2.0 and not by["queue_depth"][0].monotonic
    stepped = await tele.queries.metrics(
        app.id, name="orders", since=since, until=datetime.now(UTC) + WIDE, step=timedelta(hours=2), limit=100
    )
    assert [(p.name, p.value) for p in stepped] == [("orders", 5.0)]


async def test_a_token_writes_only_into_its_own_instance(tele: Telemetry) -> None:
    """An export with A's token that claims B's instance (and tenant) in its resource is stored
    under A and shows nowhere in B; an unknown token is refused (401 / UNAUTHENTICATED)."""
    a = await make_app(tele, "alpha", "ten_a")
    b = await make_app(tele, "beta", "ten_b")
    forged = Resource.create(
        {"service.name": "x", "ctrlmesh.instance.id": b.id, "ctrlmesh.tenant.id": b.tenant_id}
    )
    forger = App(a.id, a.tenant_id, {**a.env, "OTEL_RESOURCE_ATTRIBUTES": ""})
    spans = [
        ReadableSpan(
            name=s.name, context=s.context, parent=s.parent, resource=forged, kind=s.kind,
            start_time=s.start_time, end_time=s.end_time,
        )
        for s in sdk_spans(forger)
    ]  # fmt: skip
    base = a.env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    exporter = HttpSpanExporter(endpoint=f"{base}/v1/traces", headers=a.headers)
    assert (await asyncio.to_thread(exporter.export, spans)).name == "SUCCESS"
    since = datetime.now(UTC) - WIDE
    assert await tele.queries.traces(b.id, since=since, trace_id="", min_duration=None, limit=10) == []
    mine = await tele.queries.traces(a.id, since=since, trace_id="", min_duration=None, limit=10)
    assert {sp.resource["ctrlmesh.instance.id"] for g in mine for sp in g.spans} == {a.id}
    assert {sp.resource["ctrlmesh.tenant.id"] for g in mine for sp in g.spans} == {a.tenant_id}

    async with httpx.AsyncClient() as c:
        r = await c.post(
            f"{base}/v1/traces",
            content=trace_service_pb2.ExportTraceServiceRequest().SerializeToString(),
            headers={"content-type": "application/x-protobuf", "x-ctrlmesh-otlp-token": "otlp_nope"},
        )
    assert r.status_code == 401 and status_pb2.Status.FromString(r.content).code == code_pb2.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tele.receiver.grpc_port}") as ch:
        call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(b"", metadata=(("x-ctrlmesh-otlp-token", "otlp_nope"),), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def one_span_request(claims: str = "") -> trace_service_pb2.ExportTraceServiceRequest:
    now = int(datetime.now(UTC).timestamp() * 1e9)
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(
                    attributes=[common_pb2.KeyValue(key="x", value=common_pb2.AnyValue(string_value=claims))]
                ),
                scope_spans=[
                    trace_pb2.ScopeSpans(
                        spans=[
                            trace_pb2.Span(
                                trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="json",
                                start_time_unix_nano=now, end_time_unix_nano=now + 1000,
                            ),
                            trace_pb2.Span(trace_id=b"\x01" * 3, span_id=b"\x03" * 8, name="bad"),
                        ]
                    )
                ],
            )
        ]
    )  # fmt: skip


async def test_garbage_and_oversized_payloads_are_refused_cleanly(tele: Telemetry) -> None:
    """Garbage protobuf, garbage JSON and corrupt gzip are 400 / INVALID_ARGUMENT with a
    google.rpc.Status; an export over the size limit is 413 / RESOURCE_EXHAUSTED; a malformed
    span is rejected by partial success while its neighbours are kept; OTLP/JSON with hex ids
    works; the receiver keeps serving afterwards."""
    app = await make_app(tele, "garbage")
    base = app.env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    pb = {"content-type": "application/x-protobuf", **app.headers}
    js = {"content-type": "application/json", **app.headers}
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(f"{base}/v1/traces", content=b"\xff\xfe garbage \x00" * 10, headers=pb)
        assert (
            r.status_code == 400 and status_pb2.Status.FromString(r.content).code == code_pb2.INVALID_ARGUMENT
        )
        r = await c.post(f"{base}/v1/metrics", content=b"{not json", headers=js)
        assert r.status_code == 400 and r.json()["code"] == code_pb2.INVALID_ARGUMENT
        r = await c.post(f"{base}/v1/traces", content=b'{"resourceSpans": 7}', headers=js)
        assert r.status_code == 400
        r = await c.post(
            f"{base}/v1/traces", content=b"\x1f\x8b broken", headers={**pb, "content-encoding": "gzip"}
        )
        assert r.status_code == 400
        r = await c.post(f"{base}/v1/traces", content=b"\x00" * (300 * 1024), headers=pb)
        assert (
            r.status_code == 413
            and status_pb2.Status.FromString(r.content).code == code_pb2.RESOURCE_EXHAUSTED
        )
        bomb = gzip.compress(b"\x00" * (2 * 1024 * 1024))
        r = await c.post(f"{base}/v1/traces", content=bomb, headers={**pb, "content-encoding": "gzip"})
        assert r.status_code == 413
        r = await c.post(
            f"{base}/v1/traces", content=b"x", headers={"content-type": "text/plain", **app.headers}
        )
        assert r.status_code == 415

        body = json_format.MessageToDict(one_span_request())
        for sp in body["resourceSpans"][0]["scopeSpans"][0]["spans"]:
            for k in ("traceId", "spanId"):
                sp[k] = base64.b64decode(sp[k]).hex()
        r = await c.post(f"{base}/v1/traces", json=body, headers=js)
        assert r.status_code == 200, r.text
        assert r.json()["partialSuccess"]["rejectedSpans"] == "1"
        r = await c.post(
            f"{base}/v1/traces", content=gzip.compress(one_span_request().SerializeToString()),
            headers={**pb, "content-encoding": "gzip"},
        )  # fmt: skip
        assert r.status_code == 200
        partial = trace_service_pb2.ExportTraceServiceResponse.FromString(r.content).partial_success
        assert partial.rejected_spans == 1 and "trace_id" in partial.error_message

    async with grpc.aio.insecure_channel(f"127.0.0.1:{tele.receiver.grpc_port}") as ch:
        call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        md = tuple(app.headers.items())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(b"\xff\xfe garbage \x00" * 10, metadata=md, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(b"\x00" * (300 * 1024), metadata=md, timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = await call(one_span_request().SerializeToString(), metadata=md, timeout=5)
        assert trace_service_pb2.ExportTraceServiceResponse.FromString(ok).partial_success.rejected_spans == 1
    groups = await tele.queries.traces(
        app.id, since=datetime.now(UTC) - WIDE, trace_id="", min_duration=None, limit=10
    )
    assert [sp.name for g in groups for sp in g.spans] == ["json"] * 3


async def test_an_instance_over_its_rate_is_told_when_to_retry(tele: Telemetry) -> None:
    """Past the per-instance burst, exports get 429 with Retry-After and RetryInfo (HTTP) and
    RESOURCE_EXHAUSTED with RetryInfo (gRPC); another instance is not held back."""
    app = await make_app(tele, "busy")
    other = await make_app(tele, "calm")
    tele.ingest.limiter = RateLimiter(0.2, 2)
    try:
        base = app.env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        body = trace_service_pb2.ExportTraceServiceRequest().SerializeToString()
        async with httpx.AsyncClient(timeout=10) as c:
            codes = []
            for _ in range(3):
                r = await c.post(
                    f"{base}/v1/traces",
                    content=body,
                    headers={"content-type": "application/x-protobuf", **app.headers},
                )
                codes.append(r.status_code)
            assert codes == [200, 200, 429]
            assert int(r.headers["retry-after"]) >= 1
            st = status_pb2.Status.FromString(r.content)
            info = error_details_pb2.RetryInfo()
            assert st.code == code_pb2.RESOURCE_EXHAUSTED and st.details[0].Unpack(info)
            assert info.retry_delay.seconds >= 1
            r = await c.post(
                f"{base}/v1/traces",
                content=body,
                headers={"content-type": "application/x-protobuf", **other.headers},
            )
            assert r.status_code == 200
        async with grpc.aio.insecure_channel(f"127.0.0.1:{tele.receiver.grpc_port}") as ch:
            call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(body, metadata=tuple(app.headers.items()), timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        st = rpc_status.from_call(e.value)
        assert st is not None and st.details[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    finally:
        tele.ingest.limiter = RateLimiter(1000, 1000)


async def test_a_redeploy_rotates_the_token_and_keeps_the_previous_one(tele: Telemetry) -> None:
    """Each rollout issues a new token; those of the current and the previous release keep
    working (old replicas are still exporting, a scale adds replicas), those of the release
    before stop; tokens are stored hashed only."""
    app = await make_app(tele, "rotor")
    inst = Inst(app.id, app.tenant_id, "rotor")
    second = App(app.id, app.tenant_id, (await tele.rollout_env(inst, "rel_2", [{"name": "web"}]))[0]["env"])
    again = App(app.id, app.tenant_id, (await tele.rollout_env(inst, "rel_2", [{"name": "web"}]))[0]["env"])
    third = App(app.id, app.tenant_id, (await tele.rollout_env(inst, "rel_3", [{"name": "web"}]))[0]["env"])
    tele.tokens._cache.clear()
    tokens = [x.headers["x-ctrlmesh-otlp-token"] for x in (app, second, again, third)]
    assert len(set(tokens)) == 4
    owners = [await tele.tokens.owner(t) for t in tokens]
    assert owners[0] is None and all(o is not None and o.instance_id == app.id for o in owners[1:])
    assert "rel_3" in third.env["OTEL_RESOURCE_ATTRIBUTES"]
    async with tele.store.db.session() as s:
        stored = (await s.execute(text("SELECT token_hash FROM instances.telemetry_tokens"))).scalars().all()
    assert not set(tokens) & set(stored)


async def test_retention_drops_whole_old_partitions(tele: Telemetry) -> None:
    """Rows are written into day partitions; once a whole day is older than the retention its
    partition is dropped (and nothing newer), and rows older than the retention are refused."""
    app = await make_app(tele, "old")
    now = datetime.now(UTC)
    ten_days_ago = now - timedelta(days=10)
    clock = {"now": ten_days_ago}
    store = Store(tele.store.db, retention=timedelta(days=7), clock=lambda: clock["now"])
    row = (
        app.tenant_id,
        app.id,
        "00" * 16,
        "01" * 8,
        "",
        True,
        "old",
        "server",
        "ok",
        "",
        ten_days_ago,
        5,
        "{}",
        "{}",
        "",
    )
    await store.write_spans([row])
    await store.write_spans([(*row[:10], now, *row[11:])])
    clock["now"] = now
    parts = {name for table, name, _ in await store.partitions() if table == "telemetry_spans"}
    old = f"telemetry_spans_p{ten_days_ago:%Y%m%d}"
    assert old in parts and f"telemetry_spans_p{now:%Y%m%d}" in parts
    dropped = await store.drop_expired()
    assert old in dropped and all(
        d < f"telemetry_spans_p{now - timedelta(days=7):%Y%m%d}" for d in dropped if "spans" in d
    )
    parts = {name for _, name, _ in await store.partitions()}
    assert old not in parts and f"telemetry_spans_p{now:%Y%m%d}" in parts
    groups = await tele.queries.traces(
        app.id, since=now - timedelta(days=30), trace_id="", min_duration=None, limit=10
    )
    assert [sp.start_time for g in groups for sp in g.spans] == [now.replace(microsecond=now.microsecond)]
    window = decode.Window(now, timedelta(days=7))
    assert not window.holds(now - timedelta(days=8)) and window.holds(now - timedelta(days=6))
