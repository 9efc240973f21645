"""OpenTelemetry and Prometheus for every process, configured once at start.

Tracing follows the standard `OTEL_*` variables: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans
go to that collector over OTLP/gRPC; W3C trace context is the propagator, so the edge span, the
gRPC client and server spans and the SQL spans of one request share one trace id.
Custom span attributes use the `ctrlmesh.` prefix and are named here, in one registry.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import start_http_server
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


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def setup_tracing(service_name: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces over OTLP for %s", service_name)
    trace.set_tracer_provider(provider)
    return provider


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


def scrub_server_span(span: trace.Span, scope: dict[str, object]) -> None:
    """`server_request_hook` of the ASGI instrumentation: rewrite the URL attributes it has just
    set, so a credential in the query string never leaves the process in a trace."""
    attributes = getattr(span, "attributes", None) or {}
    for name in _URL_ATTRIBUTES:
        value = attributes.get(name)
        if isinstance(value, str) and "=" in value:
            redacted = redact_query(value)
            if redacted != value:
                span.set_attribute(name, redacted)


def instrument_engine(engine: AsyncEngine) -> None:
    SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine)


def serve_metrics(host: str, port: int) -> None:
    """Prometheus /metrics for this process, on its own port."""
    start_http_server(port, addr=host)
