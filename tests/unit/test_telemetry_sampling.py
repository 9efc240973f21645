"""Spans cost only while a trace is recorded: parent-based sampling, nothing without an exporter,
and a trace id that still crosses processes when nothing is recorded (libs/telemetry.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from sqlalchemy import create_engine, text

from libs import telemetry


def recorder(ratio: float = 1.0, *, export: bool = True) -> tuple[trace.Tracer, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=telemetry.sampler(ratio, export=export))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider.get_tracer("test"), memory


def remote(sampled: bool) -> Any:
    ctx = SpanContext(
        trace_id=0x1234,
        span_id=0x99,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(NonRecordingSpan(ctx))


def test_without_an_exporter_nothing_is_recorded_but_every_span_has_a_trace_id():
    """No exporter: a new trace, or one a caller marked sampled, is not recorded, yet has its id."""
    tracer, memory = recorder(1.0, export=False)
    root = tracer.start_span("root")
    child = tracer.start_span("child", context=remote(sampled=True))
    assert not root.is_recording() and not child.is_recording()
    assert root.get_span_context().trace_id != 0
    assert child.get_span_context().trace_id == 0x1234
    root.end()
    child.end()
    assert memory.get_finished_spans() == ()


def test_sampling_follows_the_caller_and_the_ratio_decides_new_traces():
    """With an exporter: the caller's decision is kept either way; a new trace follows the ratio."""
    tracer, _ = recorder(1.0)
    assert tracer.start_span("a", context=remote(sampled=True)).is_recording()
    assert not tracer.start_span("b", context=remote(sampled=False)).is_recording()
    assert tracer.start_span("c").is_recording()
    never, _ = recorder(0.0)
    assert not never.start_span("d").is_recording()
    assert never.start_span("e", context=remote(sampled=True)).is_recording()


async def _serve(tracer: trace.Tracer, seen: list[Any]) -> tuple[grpc.aio.Server, int]:
    async def call(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        with telemetry.rpc_server_span("/test.Echo/Call", context.invocation_metadata(), tracer) as span:
            seen.append(span.get_span_context())
            telemetry.finish_rpc_span(span, "OK")
        return request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.mark.timeout(30)
async def test_one_client_and_one_server_span_per_rpc_only_while_recorded():
    """A recorded trace gets a client span and a server span per RPC, parent and child; an
    unrecorded one gets none, but the server still continues the caller's trace id."""
    tracer, memory = recorder(1.0)
    seen: list[Any] = []
    server, port = await _serve(tracer, seen)
    try:
        async with telemetry.TracedChannel(grpc.aio.insecure_channel(f"127.0.0.1:{port}"), tracer) as ch:
            echo = ch.unary_unary("/test.Echo/Call")
            with tracer.start_as_current_span("request") as parent:
                assert await echo(b"x", timeout=5) == b"x"
            await asyncio.sleep(0.05)  # the client span ends in the call's done callback
            finished = memory.get_finished_spans()
            assert sorted(s.name for s in finished) == ["request", "test.Echo/Call", "test.Echo/Call"]
            by_kind = {s.kind: s for s in memory.get_finished_spans()}
            client, srv = by_kind[trace.SpanKind.CLIENT], by_kind[trace.SpanKind.SERVER]
            assert client.parent is not None and client.parent.span_id == parent.get_span_context().span_id
            assert srv.parent is not None and srv.parent.span_id == client.context.span_id
            assert srv.context.trace_id == parent.get_span_context().trace_id
            assert client.attributes is not None and client.attributes["rpc.grpc.status_code"] == 0

            memory.clear()
            seen.clear()
            with tracer.start_as_current_span("unrecorded", context=remote(sampled=False)) as quiet:
                assert not quiet.is_recording()
                assert await echo(b"y", timeout=5) == b"y"
            await asyncio.sleep(0.05)
            assert memory.get_finished_spans() == ()
            assert seen[0].trace_id == 0x1234 and not seen[0].trace_flags.sampled
    finally:
        await server.stop(0)


async def _asgi(app: Any, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> list[Any]:
    sent: list[Any] = []
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": [(b"host", b"edge:8080"), *headers],
        "scheme": "http",
        "http_version": "1.1",
        "client": ("127.0.0.1", 5000),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_the_edge_span_is_named_by_its_route():
    """A recorded request: one server span, named by the route the edge matched, with its status."""
    tracer, memory = recorder(1.0)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        telemetry.name_server_span("GET /v2/events")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent = await _asgi(telemetry.AsgiTracing(app, tracer), "/v2/events", b"x=1", [])
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    (span,) = memory.get_finished_spans()
    assert span.name == "GET /v2/events" and span.kind == trace.SpanKind.SERVER
    attrs = dict(span.attributes or {})
    assert attrs["http.status_code"] == 200 and attrs["http.route"] == "/v2/events"


async def test_an_unrecorded_request_passes_through_untouched():
    """Not recorded: no span, and the app gets the server's own `send` (no wrapper per message),
    while the trace id of the caller's `traceparent` is the current one."""
    tracer, memory = recorder(1.0)
    got: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got["send"] = send
        got["trace_id"] = trace.get_current_span().get_span_context().trace_id

    parent = b"00-0000000000000000000000000000abcd-00000000000000ef-00"

    async def run() -> Any:
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": "/x", "headers": [(b"traceparent", parent)]}
        await telemetry.AsgiTracing(app, tracer)(scope, receive, send)
        return send

    send = await run()
    assert got["send"] is send
    assert got["trace_id"] == 0xABCD
    assert memory.get_finished_spans() == ()


def test_one_sql_span_per_statement_only_inside_a_recorded_trace():
    """Statements outside any span or in an unrecorded trace make no span; inside a recorded one
    each statement is a client span, its child, with the statement text and no parameter value."""
    tracer, memory = recorder(1.0)
    engine = create_engine("sqlite://")
    telemetry.instrument_engine(engine, tracer)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        with tracer.start_as_current_span("quiet", context=remote(sampled=False)):
            conn.execute(text("SELECT 2"))
        assert memory.get_finished_spans() == ()
        with tracer.start_as_current_span("request") as parent:
            conn.execute(text("SELECT :secret"), {"secret": "p4ssw0rd"})
            conn.execute(text("SELECT 3"))
    sql = [s for s in memory.get_finished_spans() if s.kind == trace.SpanKind.CLIENT]
    assert len(sql) == 2
    for s in sql:
        assert s.parent is not None and s.parent.span_id == parent.get_span_context().span_id
        attrs = dict(s.attributes or {})
        assert attrs["db.system"] == "sqlite" and attrs["db.operation"] == "SELECT"
    assert "p4ssw0rd" not in repr([dict(s.attributes or {}) for s in sql])
