"""Credentials in a query string never reach a span: the edge's server span redacts them."""

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs.telemetry import AsgiTracing, redact_query


def test_redact_query_replaces_only_secret_values():
    """`token` is redacted in full URLs, targets and bare queries; other parameters are kept."""
    assert redact_query("http://h:1/v2/events?token=cmk_abc&x=1") == "http://h:1/v2/events?token=REDACTED&x=1"
    assert (
        redact_query("/v1/instances/i/logs/stream?token=cmk_abc")
        == "/v1/instances/i/logs/stream?token=REDACTED"
    )
    assert redact_query("token=cmk_abc&since=5") == "token=REDACTED&since=5"
    assert redact_query("http://h/v2/tenants?limit=5") == "http://h/v2/tenants?limit=5"
    assert redact_query("/v2/events") == "/v2/events"


async def test_the_edge_span_never_holds_a_query_credential():
    """The edge's server span (libs.telemetry.AsgiTracing) records its URL attributes redacted."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        pass

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v2/events",
        "raw_path": b"/v2/events",
        "query_string": b"token=cmk_secret&since=5",
        "headers": [(b"host", b"h")],
        "scheme": "http",
    }
    await AsgiTracing(app, provider.get_tracer("t"))(scope, receive, send)
    (span,) = memory.get_finished_spans()
    assert span.attributes["http.url"] == "http://h/v2/events?token=REDACTED&since=5"
    assert span.attributes["http.target"] == "/v2/events?token=REDACTED&since=5"
    assert "cmk_secret" not in repr(dict(span.attributes))
