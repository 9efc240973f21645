"""The figures an operator watches on the PG Gateway, as Prometheus metrics.

Held in one object built once per gateway with its own registry (so several gateways can run in
one test process); `main` serves that registry on CTRLMESH_PG_METRICS_PORT. Labels are bounded
sets (reasons, failure kinds), never tenant or database names.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
_WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class HotPathMetrics(Collector):
    """The per-transaction figures (checkouts and their waits), kept as plain numbers and
    exported at scrape time: prometheus_client's locked values would cost the relay a measurable
    share of its CPU at tens of thousands of transactions a second. The event loop is the only
    writer."""

    def __init__(self) -> None:
        self.checkouts = 0
        self._wait_counts = [0] * (len(_WAIT_BUCKETS) + 1)
        self._wait_sum = 0.0

    def checkout(self, waited: float) -> None:
        self.checkouts += 1
        if waited <= 0.0:  # an idle backend at once: the common case, no search
            self._wait_counts[0] += 1
            return
        self._wait_counts[bisect.bisect_left(_WAIT_BUCKETS, waited)] += 1
        self._wait_sum += waited

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "pggateway_checkouts",
            "Backends handed to a client (one per pooled transaction).",
            value=self.checkouts,
        )
        cumulative, buckets = 0, []
        for bound, n in zip((*map(str, _WAIT_BUCKETS), "+Inf"), self._wait_counts, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "pggateway_checkout_wait_seconds",
            "Time a client waited for a backend.",
            buckets=buckets,
            sum_value=self._wait_sum,
        )


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.client_connections = Gauge(
            "pggateway_client_connections", "Client connections open (authenticated and routed).", registry=r
        )
        self.client_connections_total = Counter(
            "pggateway_client_connections_accepted_total", "Client connections accepted (TCP).", registry=r
        )
        self.server_connections = Gauge(
            "pggateway_server_connections", "Backend connections to computes, open.", registry=r
        )
        self.server_connections_total = Counter(
            "pggateway_server_connections_opened_total", "Backend connections opened.", registry=r
        )
        self.hot = HotPathMetrics()
        r.register(self.hot)
        self.checkout_timeouts_total = Counter(
            "pggateway_checkout_timeouts_total",
            "Clients refused after waiting too long for a backend.",
            registry=r,
        )
        self.pinned_sessions = Gauge(
            "pggateway_pinned_sessions", "Client sessions pinned to their backend now.", registry=r
        )
        self.pinned_total = Counter(
            "pggateway_pins_total", "Sessions that became pinned, by reason.", ["reason"], registry=r
        )
        self.cold_starts_total = Counter(
            "pggateway_cold_starts_total",
            "Wake-ups that held a client while the database booted.",
            registry=r,
        )
        self.wake_seconds = Histogram(
            "pggateway_wake_seconds",
            "Time a client was held for its database to boot.",
            buckets=_WAKE_BUCKETS,
            registry=r,
        )
        self.auth_failures_total = Counter(
            "pggateway_auth_failures_total",
            "Refused logins by reason (password, unknown_user, suspended, ssl_required, protocol).",
            ["reason"],
            registry=r,
        )
        self.connection_errors_total = Counter(
            "pggateway_connection_errors_total",
            "Client-visible errors by failure class (user, client, quota, control_plane, compute, gateway).",
            ["kind"],
            registry=r,
        )
        self.cancel_requests_total = Counter(
            "pggateway_cancel_requests_total",
            "CancelRequests by outcome: forwarded to a backend, passed_on to the worker that owns the session, ignored.",
            ["outcome"],
            registry=r,
        )
        self.backends_lost_total = Counter(
            "pggateway_backends_lost_total",
            "Backend connections the compute closed unexpectedly (terminated, timed out, crashed).",
            registry=r,
        )
        self.compute_lost_total = Counter(
            "pggateway_compute_lost_total",
            "Lost backends whose compute was then found gone (no login): pool dropped, writer re-resolved.",
            registry=r,
        )
        self.tls_handshake_failures_total = Counter(
            "pggateway_tls_handshake_failures_total", "TLS handshakes that failed.", registry=r
        )
        self.leases = Gauge("pggateway_leases", "Database leases held.", registry=r)
        # Handoffs (freeze → switch): how long clients' checkouts were held, and how many.
        self.freeze_window_seconds = Histogram(
            "pggateway_freeze_window_seconds",
            "From the first checkout held by a handoff's freeze to its release.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10),
            registry=r,
        )
        self.checkouts_held = Gauge(
            "pggateway_checkouts_held", "Checkouts waiting for a handoff's freeze to lift now.", registry=r
        )
        self.checkouts_held_total = Counter(
            "pggateway_held_checkouts_released_total",
            "Checkouts a handoff's freeze held (released, not failed).",
            registry=r,
        )
        self.freezes_total = Counter(
            "pggateway_freezes_total", "Freezes applied, by how they arrived.", ["source"], registry=r
        )
        self.control_stream_up = Gauge(
            "pggateway_control_stream_up", "1 while the control stream from databases is open.", registry=r
        )
