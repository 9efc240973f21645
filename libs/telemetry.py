"""OpenTelemetry and Prometheus for every process, configured once at start.

Tracing follows the standard `OTEL_*` variables: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans
go to that collector over OTLP/gRPC; W3C trace context is the propagator, so the edge span, the
gRPC client and server spans and the SQL spans of one request share one trace id.
Custom span attributes use the `ctrlmesh.` prefix and are named here, in one registry.

What a span costs is paid only for a trace that is recorded. The edge (or a background loop)
decides for each new trace (`CTRLMESH_TRACE_SAMPLE_RATIO`), every process downstream follows the
caller's decision (parent-based sampling), and without an exporter nothing is recorded at all:
no exporter, no batch processor and its thread, no attributes computed. An unrecorded trace still
has its id, made current and passed on in `traceparent`, so the logs and error messages of one
request name the same trace in every process. The three places spans are made are here: the
HTTP server span (`AsgiTracing`), one span per RPC on each side (`rpc_server_span`,
`TracedChannel`) and one per SQL statement (`instrument_engine`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import start_http_server
from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine

# The attribute registry: every custom attribute we set on spans.
ATTR_TENANT = "ctrlmesh.tenant_id"
ATTR_PRINCIPAL = "ctrlmesh.key_id"
ATTR_ROUTE = "ctrlmesh.route"
ATTR_REASON = "ctrlmesh.error_reason"
# The PG Gateway's connection and wake-up spans.
ATTR_DATABASE = "ctrlmesh.database"
ATTR_PG_USER = "ctrlmesh.pg.user"
ATTR_PG_OUTCOME = "ctrlmesh.pg.outcome"
ATTR_PG_COLD_START = "ctrlmesh.pg.cold_start"
ATTR_PG_PIN_REASON = "ctrlmesh.pg.pin_reason"
# A writer profile handoff (the databases service's handoff trace).
ATTR_HANDOFF_FROM = "ctrlmesh.handoff.from_profile"
ATTR_HANDOFF_TO = "ctrlmesh.handoff.to_profile"
ATTR_HANDOFF_TERM = "ctrlmesh.handoff.term"
ATTR_HANDOFF_RESULT = "ctrlmesh.handoff.result"

log = logging.getLogger("ctrlmesh.telemetry")

# Query parameters that carry credentials (`?token=` on SSE routes, for EventSource); their
# values never reach a span.
SECRET_QUERY_PARAMS = frozenset({"token"})
# The HTTP span attributes (old and new semantic conventions) that can hold a query string.
_URL_ATTRIBUTES = ("http.url", "http.target", "url.full", "url.query")

# The trace-context keys of gRPC metadata and HTTP headers (W3C trace context).
_TRACE_KEYS = frozenset({"traceparent", "tracestate"})
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
# gRPC codes that are the server's failure (OpenTelemetry's RPC conventions): a span with one of
# them has an error status; NOT_FOUND and its kind are the caller's and leave it unset.
_SERVER_FAULTS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_GRPC_CODES = {c.name: c.value[0] for c in grpc.StatusCode}


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def exporting() -> bool:
    """Whether spans leave this process: only then is any of them recorded."""
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def sampler(sample_ratio: float, *, export: bool) -> Sampler:
    """Parent-based: a trace begun elsewhere is recorded here exactly when the caller recorded
    it; a new trace with probability `sample_ratio`. Nothing at all without an exporter (a span
    no one receives is pure cost), though each span still gets its trace id."""
    if not export:
        return ALWAYS_OFF
    return ParentBased(TraceIdRatioBased(sample_ratio))


def setup_tracing(service_name: str, sample_ratio: float = 1.0) -> TracerProvider:
    export = exporting()
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}), sampler=sampler(sample_ratio, export=export)
    )
    if export:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces over OTLP for %s (sample ratio %s)", service_name, sample_ratio)
    trace.set_tracer_provider(provider)
    return provider


# Resolves to the process's provider once setup_tracing has set it (a proxy until then).
TRACER = trace.get_tracer("ctrlmesh")


# -- gRPC: one span per RPC on each side -----------------------------------------------------------


@contextmanager
def rpc_server_span(
    method: str, metadata: Sequence[tuple[str, str | bytes]] | None, tracer: trace.Tracer = TRACER
) -> Iterator[Span]:
    """The server span of one RPC, current while it runs: child of the caller's span carried in
    the metadata (recorded only if the caller's was). Finish it with `finish_rpc_span`."""
    carrier = {k: v for k, v in metadata or () if k in _TRACE_KEYS and isinstance(v, str)}
    parent = propagate.extract(carrier) if carrier else None
    with tracer.start_as_current_span(
        method.lstrip("/"),
        context=parent,
        kind=SpanKind.SERVER,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        if span.is_recording():
            service, _, name = method.lstrip("/").partition("/")
            span.set_attributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
        yield span


def finish_rpc_span(span: Span, code: str) -> None:
    """Record the call's final gRPC code (by name) on its span."""
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", _GRPC_CODES.get(code, 2))
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, code))


def _done_code(call: Any) -> str:
    """A finished call's code without awaiting: its status is already there, so `code()` returns
    at its first step (a call still running answers UNKNOWN; it is not one)."""
    coro = call.code()
    try:
        coro.send(None)
    except StopIteration as stop:
        return str(stop.value.name)
    coro.close()
    return "UNKNOWN"


class _TracedMultiCallable:
    """One method of a `TracedChannel`: the caller's trace context goes into the metadata, and
    while the trace is recorded a client span covers the call until it is done."""

    def __init__(self, inner: Any, method: str, tracer: trace.Tracer, on_call: Callable[[], None] | None):
        self._inner = inner
        self._tracer = tracer
        self._on_call = on_call
        self._name = method.lstrip("/")
        service, _, name = self._name.partition("/")
        self._attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    def __call__(self, request: Any, *, metadata: Any = None, **kw: Any) -> Any:
        if self._on_call is not None:
            self._on_call()
        span = self._tracer.start_span(self._name, kind=SpanKind.CLIENT)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        outgoing = [*(metadata or ()), *carrier.items()]
        if not span.is_recording():
            return self._inner(request, metadata=outgoing, **kw)
        span.set_attributes(self._attributes)
        try:
            call = self._inner(request, metadata=outgoing, **kw)
        except BaseException:
            span.end()
            raise

        def done(c: Any) -> None:
            code = _done_code(c)
            span.set_attribute("rpc.grpc.status_code", _GRPC_CODES.get(code, 2))
            if code != "OK":
                span.set_status(Status(StatusCode.ERROR, code))
            span.end()

        call.add_done_callback(done)
        return call


class TracedChannel(grpc.aio.Channel):
    """A channel whose calls carry the trace and, while it is recorded, a client span each.

    Instead of gRPC's client interceptors: an intercepted call runs in a task of its own and
    OpenTelemetry's interceptor builds its span and attributes for every call, recorded or not."""

    def __init__(
        self,
        inner: grpc.aio.Channel,
        tracer: trace.Tracer = TRACER,
        *,
        on_call: Callable[[], None] | None = None,
    ):
        self._inner = inner
        self._tracer = tracer
        # Told of every call (libs/budget.py counts the calls an RPC makes to other services).
        self._on_call = on_call

    def unary_unary(self, method: str, *args: Any, **kw: Any) -> Any:
        return _TracedMultiCallable(
            self._inner.unary_unary(method, *args, **kw), method, self._tracer, self._on_call
        )

    def unary_stream(self, method: str, *args: Any, **kw: Any) -> Any:
        return _TracedMultiCallable(
            self._inner.unary_stream(method, *args, **kw), method, self._tracer, self._on_call
        )

    def stream_unary(self, method: str, *args: Any, **kw: Any) -> Any:
        return _TracedMultiCallable(
            self._inner.stream_unary(method, *args, **kw), method, self._tracer, self._on_call
        )

    def stream_stream(self, method: str, *args: Any, **kw: Any) -> Any:
        return _TracedMultiCallable(
            self._inner.stream_stream(method, *args, **kw), method, self._tracer, self._on_call
        )

    async def __aenter__(self) -> TracedChannel:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._inner.close()

    async def close(self, grace: float | None = None) -> None:
        await self._inner.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._inner.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._inner.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._inner.channel_ready()


# -- HTTP: the edge's server span ----------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


class AsgiTracing:
    """The server span of every HTTP request (named by the route once the edge has matched it);
    attributes, and the wrapper that reads the status, only while the trace is recorded. URL
    attributes never hold a credential from the query string (`redact_query`)."""

    def __init__(self, app: Asgi, tracer: trace.Tracer = TRACER):
        self.app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in _TRACE_HEADERS}
        parent = propagate.extract(carrier) if carrier else None
        with self._tracer.start_as_current_span(
            scope["method"], context=parent, kind=SpanKind.SERVER, record_exception=False
        ) as span:
            if not span.is_recording():
                await self.app(scope, receive, send)
                return
            span.set_attributes(_http_attributes(scope))

            async def traced_send(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, traced_send)


def _http_attributes(scope: Scope) -> dict[str, Any]:
    query = scope.get("query_string", b"").decode("latin-1")
    path = scope.get("raw_path", b"").decode("latin-1") or scope.get("path", "")
    target = redact_query(f"{path}?{query}" if query else path)
    host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
    attributes: dict[str, Any] = {
        "http.method": scope["method"],
        "http.scheme": scope.get("scheme", "http"),
        "http.flavor": scope.get("http_version", ""),
        "http.target": target,
        "http.url": f"{scope.get('scheme', 'http')}://{host}{target}",
    }
    if host:
        attributes["http.host"] = host
    client = scope.get("client")
    if client:
        attributes["net.peer.ip"], attributes["net.peer.port"] = client[0], client[1]
    return attributes


def redact_query(url: str) -> str:
    """`url` (a full URL, a target or a bare query) with secret query values replaced by REDACTED."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    bare = "?" not in url and "=" in url and "/" not in url
    parts = urlsplit("?" + url if bare else url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(k in SECRET_QUERY_PARAMS for k, _ in pairs):
        return url
    query = urlencode([(k, "REDACTED" if k in SECRET_QUERY_PARAMS else v) for k, v in pairs])
    return query if bare else urlunsplit(parts._replace(query=query))


def name_server_span(label: str) -> None:
    """Name the current HTTP server span after the route it matched (`GET /v2/dbs/{db_id}`)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.update_name(label)
        span.set_attribute("http.route", label.partition(" ")[2])


# -- SQL: one span per statement ---------------------------------------------------------------


def instrument_engine(engine: AsyncEngine | Engine, tracer: trace.Tracer = TRACER) -> None:
    """A client span per statement of `engine`, only inside a recorded trace: a statement of an
    unrecorded request (or of a loop outside any span) costs one check."""
    sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    url = sync.url
    base: dict[str, Any] = {
        "db.system": sync.dialect.name,
        "db.name": url.database or "",
        "db.user": url.username or "",
    }
    if url.host:
        base["net.peer.name"] = url.host
    if url.port:
        base["net.peer.port"] = url.port

    def before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        if not trace.get_current_span().is_recording():
            return
        words = statement.split(None, 1)
        operation = words[0].upper() if words else "SQL"
        context._ctrlmesh_span = tracer.start_span(
            f"{operation} {base['db.name']}".strip(),
            kind=SpanKind.CLIENT,
            attributes={**base, "db.statement": statement, "db.operation": operation},
        )

    def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        span = getattr(context, "_ctrlmesh_span", None)
        if span is not None:
            span.end()

    def failed(exception_context: Any) -> None:
        span = getattr(exception_context.execution_context, "_ctrlmesh_span", None)
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, type(exception_context.original_exception).__name__))
            span.end()

    event.listen(sync, "before_cursor_execute", before)
    event.listen(sync, "after_cursor_execute", after)
    event.listen(sync, "handle_error", failed)


def serve_metrics(host: str, port: int) -> None:
    """Prometheus /metrics for this process, on its own port."""
    start_http_server(port, addr=host)
