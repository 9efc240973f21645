"""Credentials in a query string never reach a span: the edge's server-span hook redacts them."""

from opentelemetry.sdk.trace import TracerProvider

from libs.telemetry import redact_query, scrub_server_span


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


def test_hook_rewrites_the_url_attributes_of_a_started_span():
    """The ASGI instrumentation sets http.url at start; the hook leaves no token in it."""
    tracer = TracerProvider().get_tracer("t")
    span = tracer.start_span(
        "GET /v2/events",
        attributes={"http.url": "http://h/v2/events?token=cmk_secret", "url.query": "token=cmk_secret"},
    )
    scrub_server_span(span, {})
    span.end()
    assert dict(span.attributes) == {
        "http.url": "http://h/v2/events?token=REDACTED",
        "url.query": "token=REDACTED",
    }
