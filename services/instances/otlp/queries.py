"""Reads of instance telemetry for /metrics, /traces, /resources and the dashboard. Every query
takes the instance id the caller was already authorized for (the domain checks the tenant
first), and bounds its time range so PostgreSQL prunes the day partitions it does not need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text

from libs.db import Database

S = "instances"


@dataclass(frozen=True)
class Point:
    name: str
    type: str
    unit: str
    temporality: str
    monotonic: bool
    attributes: dict[str, Any]
    time: datetime
    value: float
    count: int | None = None
    bounds: list[float] = field(default_factory=list)
    bucket_counts: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    status: str
    status_message: str
    start_time: datetime
    duration_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass(frozen=True)
class TraceGroup:
    trace_id: str
    start_time: datetime
    duration_ns: int
    root_name: str
    spans: list[Span]


@dataclass(frozen=True)
class Red:
    """Requests, errors and latency of the server spans in a window; None fields when none."""

    requests: int
    request_rate_per_sec: float | None
    error_rate_per_sec: float | None
    avg_latency_s: float | None
    p99_latency_s: float | None


@dataclass(frozen=True)
class Sample:
    time: datetime
    cpu_percent: float
    memory_used_mb: int
    memory_limit_mb: int
    network_in_mb: float
    network_out_mb: float


def _json(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v


def _sum_lists(lists: list[list[int]]) -> list[int]:
    width = max((len(x) for x in lists), default=0)
    return [sum(x[i] for x in lists if i < len(x)) for i in range(width)]


class Queries:
    def __init__(self, db: Database):
        self.db = db

    async def metrics(
        self,
        instance_id: str,
        *,
        name: str,
        since: datetime,
        until: datetime,
        step: timedelta | None,
        limit: int,
    ) -> list[Point]:
        """Points of the instance in [since, until], oldest first. With a step, one point per
        series (name, attributes) and step: a gauge's mean, a cumulative sum's or histogram's
        last value, a delta's total."""
        where = "instance_id = :i AND time >= :since AND time <= :until" + (
            " AND name = :name" if name else ""
        )
        params: dict[str, Any] = {"i": instance_id, "since": since, "until": until, "name": name, "n": limit}
        async with self.db.session() as s:
            if step is None:
                rows = await s.execute(
                    text(
                        "SELECT name, type, unit, temporality, monotonic, attributes, time, value, count, "
                        f"bounds, bucket_counts FROM {S}.telemetry_points WHERE {where} "
                        "ORDER BY time, name LIMIT :n"
                    ),
                    params,
                )
                return [
                    Point(
                        r[0],
                        r[1],
                        r[2],
                        r[3],
                        r[4],
                        _json(r[5]),
                        r[6],
                        r[7],
                        r[8],
                        list(r[9] or []),
                        list(r[10] or []),
                    )
                    for r in rows
                ]
            params["step"] = step
            rows = await s.execute(
                text(
                    "SELECT name, type, unit, temporality, bool_or(monotonic), attributes, "
                    "date_bin(:step, time, TIMESTAMPTZ '2000-01-01') AS bucket, "
                    "avg(value), sum(value), (array_agg(value ORDER BY time DESC))[1], "
                    "sum(count), (array_agg(count ORDER BY time DESC))[1], "
                    "(jsonb_agg(to_jsonb(bounds) ORDER BY time DESC))->0, "
                    "jsonb_agg(to_jsonb(bucket_counts) ORDER BY time DESC) "
                    f"FROM {S}.telemetry_points WHERE {where} "
                    "GROUP BY name, type, unit, temporality, attributes, bucket ORDER BY bucket, name LIMIT :n"
                ),
                params,
            )
            out = []
            for r in rows:
                kind, delta = r[1], r[3] == "delta"
                value = r[7] if kind == "gauge" else (r[8] if delta else r[9])
                count = r[10] if delta else r[11]
                counts = [c for c in _json(r[13]) if c is not None]
                buckets = _sum_lists(counts) if delta else (counts[0] if counts else [])
                out.append(
                    Point(
                        r[0],
                        kind,
                        r[2],
                        r[3],
                        r[4],
                        _json(r[5]),
                        r[6],
                        float(value),
                        int(count) if count is not None else None,
                        list(_json(r[12]) or []),
                        buckets,
                    )
                )
            return out

    async def traces(
        self,
        instance_id: str,
        *,
        since: datetime,
        trace_id: str,
        min_duration: timedelta | None,
        limit: int,
    ) -> list[TraceGroup]:
        """The newest `limit` traces started since `since` (by their local root span), each with
        all its spans, oldest span first. `trace_id`: that trace only, whatever its root."""
        async with self.db.session() as s:
            if trace_id:
                ids = [trace_id]
                low = since
            else:
                cond = " AND duration_ns >= :min" if min_duration is not None else ""
                roots = (
                    await s.execute(
                        text(
                            f"SELECT trace_id, start_time FROM {S}.telemetry_spans WHERE instance_id = :i "
                            f"AND root AND start_time >= :since{cond} ORDER BY start_time DESC LIMIT :n"
                        ),
                        {
                            "i": instance_id,
                            "since": since,
                            "n": limit,
                            "min": int(min_duration.total_seconds() * 1e9) if min_duration else 0,
                        },
                    )
                ).all()
                if not roots:
                    return []
                ids = list(dict.fromkeys(r[0] for r in roots))
                # Children start after their root (give clock skew a minute): prunes partitions.
                low = min(r[1] for r in roots) - timedelta(minutes=1)
            rows = await s.execute(
                text(
                    "SELECT trace_id, span_id, parent_span_id, name, kind, status, status_message, start_time, "
                    f"duration_ns, attributes, resource FROM {S}.telemetry_spans WHERE instance_id = :i "
                    "AND trace_id = ANY(:ids) AND start_time >= :low ORDER BY start_time, span_id"
                ),
                {"i": instance_id, "ids": ids, "low": low},
            )
            by_trace: dict[str, list[Span]] = {t: [] for t in ids}
            for r in rows:
                by_trace[r[0]].append(
                    Span(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], _json(r[9]), _json(r[10]))
                )
        groups = []
        for tid in ids:
            spans = by_trace[tid]
            if not spans:
                continue
            start = spans[0].start_time
            end = max(sp.start_time + timedelta(microseconds=sp.duration_ns / 1000) for sp in spans)
            ids_in = {sp.span_id for sp in spans}
            root = next((sp for sp in spans if sp.parent_span_id not in ids_in), spans[0])
            groups.append(TraceGroup(tid, start, int((end - start).total_seconds() * 1e9), root.name, spans))
        return groups

    async def red(self, instance_id: str, *, since: datetime, until: datetime) -> Red:
        async with self.db.session() as s:
            r = (
                await s.execute(
                    text(
                        "SELECT count(*), count(*) FILTER (WHERE status = 'error'), avg(duration_ns), "
                        "percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) "
                        f"FROM {S}.telemetry_spans WHERE instance_id = :i AND kind = 'server' "
                        "AND start_time >= :since AND start_time <= :until"
                    ),
                    {"i": instance_id, "since": since, "until": until},
                )
            ).one()
        n = int(r[0])
        if n == 0:
            return Red(0, None, None, None, None)
        window = max((until - since).total_seconds(), 1e-9)
        return Red(n, n / window, int(r[1]) / window, float(r[2]) / 1e9, float(r[3]) / 1e9)

    async def resources(self, instance_id: str, *, since: datetime, limit: int) -> list[Sample]:
        async with self.db.session() as s:
            rows = await s.execute(
                text(
                    "SELECT time, cpu_percent, memory_used_mb, memory_limit_mb, network_in_mb, network_out_mb "
                    f"FROM {S}.telemetry_resources WHERE instance_id = :i AND time >= :since "
                    "ORDER BY time DESC LIMIT :n"
                ),
                {"i": instance_id, "since": since, "n": limit},
            )
            return [Sample(*r) for r in reversed(rows.all())]

    async def failed_deploys(self, instance_id: str, *, since: datetime) -> int:
        async with self.db.session() as s:
            n = (
                await s.execute(
                    text(
                        f"SELECT count(*) FROM {S}.deployments WHERE instance_id = :i AND state = 'failed' "
                        "AND finished_at >= :since"
                    ),
                    {"i": instance_id, "since": since},
                )
            ).scalar_one()
        return int(n)

    async def running(self) -> list[tuple[str, str, str, str]]:
        """(id, tenant_id, provider_name, cluster_id) of every running instance: what the
        sampler visits."""
        async with self.db.session() as s:
            rows = await s.execute(
                text(
                    f"SELECT id, tenant_id, provider_name, cluster_id FROM {S}.instances"
                    " WHERE state = 'running'"
                )
            )
            return [(r[0], r[1], r[2], r[3]) for r in rows]
