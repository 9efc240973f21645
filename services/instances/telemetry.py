"""Telemetry read from the engine: resource usage (docker stats), logs (docker logs, also
followed), and the dashboard that combines them with health and deployments.

Metrics and traces are what the instance's OpenTelemetry SDK exported to the OTLP receiver
(services/instances/otlp/); the dashboard adds its request rate, error rate and latency from the
server spans of the last 5 minutes, and `/resources` the usage history sampled from the engine.
Log levels are inferred per line: a JSON
line's `level`/`severity` field, else the first level word in the line, else `info`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from libs.db import Database
from libs.errors import CtrlmeshError, NotFound
from libs.principal import Principal
from services.instances import repository as repo
from services.instances.domain import InstancesDomain
from services.instances.health import HealthDomain
from services.instances.otlp import Telemetry
from services.instances.otlp.queries import Point, Red, Sample, TraceGroup
from services.instances.providers import Registry
from services.instances.providers.base import LogLine, ProviderError, Usage
from services.instances.repository import Instance, Scope, now

# Instances whose engine usage one sampling pass reads at the same time.
SAMPLE_CONCURRENCY = 16

LEVELS = {"debug": 0, "info": 1, "warn": 2, "error": 3}
_WORD = re.compile(r"\b(DEBUG|TRACE|INFO|WARN|WARNING|ERROR|ERR|FATAL|CRITICAL|PANIC)\b", re.IGNORECASE)
_ALIASES = {
    "trace": "debug",
    "warning": "warn",
    "err": "error",
    "fatal": "error",
    "critical": "error",
    "panic": "error",
}


def level_of(message: str) -> tuple[str, dict[str, object]]:
    """(level, structured fields) of one log line."""
    text = message.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            raw = str(data.get("level") or data.get("severity") or data.get("lvl") or "info").lower()
            return _ALIASES.get(raw, raw if raw in LEVELS else "info"), data
    m = _WORD.search(text)
    if m:
        word = m.group(1).lower()
        return _ALIASES.get(word, word), {}
    return "info", {}


@dataclass
class Entry:
    line: LogLine
    level: str
    fields: dict[str, object] = field(default_factory=dict)


@dataclass
class Snapshot:
    instance: Instance
    usage: Usage
    taken_at: datetime


@dataclass
class Dashboard:
    instance: Instance
    snapshot: Snapshot | None
    health_status: str
    uptime_percent: float
    recent_deploys_24h: int
    red: Red
    active_alerts: int


RED_WINDOW = timedelta(minutes=5)
TRACES_SINCE = timedelta(hours=1)


class TelemetryDomain:
    def __init__(
        self,
        db: Database,
        instances: InstancesDomain,
        health: HealthDomain,
        registry: Registry,
        otlp: Telemetry,
    ):
        self.db = db
        self.instances = instances
        self.health = health
        self.registry = registry
        self.otlp = otlp

    async def metrics(
        self,
        p: Principal,
        instance_id: str,
        *,
        name: str,
        since: datetime | None,
        until: datetime | None,
        step: timedelta | None,
        limit: int,
    ) -> tuple[Instance, list[Point]]:
        inst = await self.instances.get(p, instance_id)
        end = until or now()
        start = since or end - TRACES_SINCE
        pts = await self.otlp.queries.metrics(
            instance_id, name=name, since=start, until=end, step=step, limit=limit or 1000
        )
        return inst, pts

    async def traces(
        self,
        p: Principal,
        instance_id: str,
        *,
        since: datetime | None,
        trace_id: str,
        min_duration: timedelta | None,
        limit: int,
    ) -> tuple[Instance, list[TraceGroup]]:
        inst = await self.instances.get(p, instance_id)
        groups = await self.otlp.queries.traces(
            instance_id,
            since=since or (now() - (self.otlp.settings.telemetry_retention if trace_id else TRACES_SINCE)),
            trace_id=trace_id,
            min_duration=min_duration,
            limit=limit or 20,
        )
        return inst, groups

    async def sample_usage(self) -> list[tuple[object, ...]]:
        """The engine's usage of every running instance now, as rows of the resource history.
        An engine's stats call takes a second or more (it waits for a second reading), so the
        instances are sampled side by side, a bounded number at a time: one pass costs about one
        call, not one call per instance."""
        t = now()
        gate = asyncio.Semaphore(SAMPLE_CONCURRENCY)

        async def one(
            instance_id: str, tenant_id: str, provider_name: str, cluster_id: str
        ) -> tuple[object, ...] | None:
            async with gate:
                try:
                    u = await self.registry.get(provider_name, cluster_id).usage(instance_id)
                except (CtrlmeshError, ProviderError):
                    return None  # its engine is away: a gap in the history, not a failed pass
            if not u.containers:
                return None
            return (
                tenant_id,
                instance_id,
                t,
                u.cpu_percent,
                u.memory_used_mb,
                u.memory_limit_mb,
                u.network_in_mb,
                u.network_out_mb,
            )

        rows = await asyncio.gather(*(one(*r) for r in await self.otlp.queries.running()))
        return [r for r in rows if r is not None]

    async def history(self, p: Principal, instance_id: str, since: datetime) -> list[Sample]:
        await self.instances.get(p, instance_id)
        return await self.otlp.queries.resources(instance_id, since=since, limit=1000)

    async def resources(self, p: Principal, instance_id: str) -> Snapshot:
        inst = await self.instances.get(p, instance_id)
        provider = self.registry.get(inst.provider_name, inst.cluster_id)
        try:
            usage = await provider.usage(instance_id)
        except ProviderError as err:
            raise NotFound(
                f"no resource snapshot of instance {instance_id!r}: {err}",
                details={"resource": "resource_snapshot"},
            ) from err
        if usage.containers == 0:
            raise NotFound(
                f"no resource snapshot of instance {instance_id!r}: nothing is running",
                details={"resource": "resource_snapshot"},
            )
        return Snapshot(inst, usage, now())

    async def logs(
        self, p: Principal, instance_id: str, *, level: str, limit: int, since: datetime | None
    ) -> list[Entry]:
        inst = await self.instances.get(p, instance_id)
        provider = self.registry.get(inst.provider_name, inst.cluster_id)
        n = limit or 100
        out: list[Entry] = []
        # Ask for more than `n` when filtering by level, so the filter still fills the page.
        async for line in provider.logs(
            instance_id, tail=n if not level else n * 10, since=since, follow=False
        ):
            lvl, fields = level_of(line.message)
            if level and LEVELS.get(lvl, 1) < LEVELS[level]:
                continue
            out.append(Entry(line, lvl, fields))
        return out[-n:]

    async def watch_logs(
        self, p: Principal, instance_id: str, *, tail: int, follow: bool, level: str
    ) -> AsyncIterator[Entry]:
        inst = await self.instances.get(p, instance_id)
        provider = self.registry.get(inst.provider_name, inst.cluster_id)
        async for line in provider.logs(instance_id, tail=tail, since=None, follow=follow):
            lvl, fields = level_of(line.message)
            if level and LEVELS.get(lvl, 1) < LEVELS[level]:
                continue
            yield Entry(line, lvl, fields)

    async def dashboard(self, p: Principal, instance_id: str) -> Dashboard:
        inst = await self.instances.get(p, instance_id)
        try:
            snap: Snapshot | None = await self.resources(p, instance_id)
        except (CtrlmeshError, ProviderError):
            snap = None  # not running, or its engine is away: the rest of the dashboard still shows
        h = await self.health.instance_health(p, instance_id)
        t = now()
        async with self.db.session() as s:
            deploys = await repo.count_recent_deployments(
                s, Scope.of(p), instance_id, t - timedelta(hours=24)
            )
        red = await self.otlp.queries.red(instance_id, since=t - RED_WINDOW, until=t)
        failing = sum(1 for c, _ in h.checks if c.status == "unhealthy")
        failed = await self.otlp.queries.failed_deploys(instance_id, since=t - timedelta(hours=1))
        return Dashboard(inst, snap, h.status, h.uptime_percent, deploys, red, failing + (1 if failed else 0))
