"""One export, whichever transport brought it: token → owner, rate limit, decode, one COPY.

The outcome is a small value the transports turn into their own answer (gRPC status, HTTP
status), so both refuse the same things the same way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from prometheus_client import Counter

from services.instances.otlp import decode
from services.instances.otlp.store import Store
from services.instances.otlp.tokens import Tokens

log = logging.getLogger("ctrlmesh.instances.otlp")

RECEIVED = Counter(
    "ctrlmesh_otlp_items_total", "Spans and metric points received from instances", ["signal", "outcome"]
)
REFUSED = Counter("ctrlmesh_otlp_refused_total", "Exports refused by the OTLP receiver", ["reason"])


class Refused(Exception):
    """An export not taken. `code` is the gRPC status name; `retry_after` seconds, when known."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class RateLimiter:
    """A token bucket per instance: `rate` exports per second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when allowed; else the seconds until the next export would be."""
        if self.rate <= 0:
            return 0.0
        t = time.monotonic()
        level, last = self._buckets.get(key, (float(self.burst), t))
        level = min(float(self.burst), level + (t - last) * self.rate)
        if level >= 1:
            self._buckets[key] = (level - 1, t)
            return 0.0
        self._buckets[key] = (level, t)
        return (1 - level) / self.rate


@dataclass(frozen=True)
class Signal:
    name: str  # "traces" or "metrics"
    request: Any
    response: Any
    partial: Any
    rejected_field: str


TRACES = Signal(
    "traces",
    trace_service_pb2.ExportTraceServiceRequest,
    trace_service_pb2.ExportTraceServiceResponse,
    trace_service_pb2.ExportTracePartialSuccess,
    "rejected_spans",
)
METRICS = Signal(
    "metrics",
    metrics_service_pb2.ExportMetricsServiceRequest,
    metrics_service_pb2.ExportMetricsServiceResponse,
    metrics_service_pb2.ExportMetricsPartialSuccess,
    "rejected_data_points",
)


class Ingest:
    def __init__(self, store: Store, tokens: Tokens, limiter: RateLimiter, *, retention: timedelta):
        self.store = store
        self.tokens = tokens
        self.limiter = limiter
        self.retention = retention

    async def owner(self, token: str | None) -> decode.Owner:
        owner = await self.tokens.owner(token or "")
        if owner is None:
            REFUSED.labels("unauthenticated").inc()
            raise Refused("UNAUTHENTICATED", "a valid ingest token is required (x-ctrlmesh-otlp-token)")
        wait = self.limiter.take(owner.instance_id)
        if wait:
            REFUSED.labels("rate_limited").inc()
            raise Refused(
                "RESOURCE_EXHAUSTED",
                "the instance's telemetry rate limit is exceeded",
                retry_after=max(1.0, math.ceil(wait)),
            )
        return owner

    async def export(self, signal: Signal, owner: decode.Owner, req: Any) -> Any:
        window = decode.Window(self.store.clock(), self.retention)
        if signal is TRACES:
            out = decode.spans(req, owner, window)
            await self.store.write_spans(out.rows)
        else:
            out = decode.points(req, owner, window)
            await self.store.write_points(out.rows)
        RECEIVED.labels(signal.name, "accepted").inc(len(out.rows))
        if out.rejected:
            RECEIVED.labels(signal.name, "rejected").inc(out.rejected)
            return signal.response(
                partial_success=signal.partial(
                    **{signal.rejected_field: out.rejected, "error_message": out.message}
                )
            )
        return signal.response()
