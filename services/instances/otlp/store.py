"""Writes of instance telemetry: one COPY per export into day-partitioned tables, the partitions
made as data arrives, and retention by dropping whole days.

A partition is named `<table>_pYYYYMMDD` and holds [day, day + 1) in UTC. Making one takes an
advisory lock so two processes (or two exports in one) never race on `CREATE TABLE`; the days
made are remembered per process, so a busy instance costs one COPY and nothing else. Retention
drops a partition once all of it is older than the retention: the rows inside the window, and
only those, are ever accepted (decode.Window), so a drop never removes a row still promised.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import text

from libs.db import Database, advisory_key
from services.instances.otlp.decode import POINT_COLUMNS, SPAN_COLUMNS

log = logging.getLogger("ctrlmesh.instances.otlp")

SCHEMA = "instances"
SPANS = "telemetry_spans"
POINTS = "telemetry_points"
RESOURCES = "telemetry_resources"
RESOURCE_COLUMNS = (
    "tenant_id",
    "instance_id",
    "time",
    "cpu_percent",
    "memory_used_mb",
    "memory_limit_mb",
    "network_in_mb",
    "network_out_mb",
)
PARTITIONED = {SPANS: "start_time", POINTS: "time", RESOURCES: "time"}
_PART = re.compile(r"^(telemetry_\w+)_p(\d{8})$")


def partition_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Store:
    def __init__(self, db: Database, *, retention: timedelta, clock: Callable[[], datetime] = utcnow):
        self.db = db
        self.retention = retention
        self.clock = clock
        self._made: set[tuple[str, date]] = set()
        self._lock = asyncio.Lock()

    async def ensure_partitions(self, table: str, days: Iterable[date]) -> None:
        missing = sorted({d for d in days if (table, d) not in self._made})
        if not missing:
            return
        async with self._lock, self.db.session() as s:
            for d in missing:
                if (table, d) in self._made:
                    continue
                name = partition_name(table, d)
                await s.execute(
                    text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("telemetry-partition", name)}
                )
                await s.execute(
                    text(
                        f"CREATE TABLE IF NOT EXISTS {SCHEMA}.{name} PARTITION OF {SCHEMA}.{table} "
                        f"FOR VALUES FROM ('{d.isoformat()}') TO ('{(d + timedelta(days=1)).isoformat()}')"
                    )
                )
        self._made.update((table, d) for d in missing)

    async def _copy(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]], at: int) -> None:
        if not rows:
            return
        await self.ensure_partitions(table, {r[at].astimezone(UTC).date() for r in rows})
        async with self.db.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            await driver.copy_records_to_table(table, schema_name=SCHEMA, columns=list(columns), records=rows)
            await conn.commit()

    async def write_spans(self, rows: list[tuple[Any, ...]]) -> None:
        await self._copy(SPANS, SPAN_COLUMNS, rows, SPAN_COLUMNS.index("start_time"))

    async def write_points(self, rows: list[tuple[Any, ...]]) -> None:
        await self._copy(POINTS, POINT_COLUMNS, rows, POINT_COLUMNS.index("time"))

    async def write_resources(self, rows: list[tuple[Any, ...]]) -> None:
        await self._copy(RESOURCES, RESOURCE_COLUMNS, rows, RESOURCE_COLUMNS.index("time"))

    async def partitions(self) -> list[tuple[str, str, date]]:
        """(table, partition, day) of every telemetry partition."""
        async with self.db.session() as s:
            rows = await s.execute(
                text(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
                    "WHERE n.nspname = :schema AND p.relname = ANY(:parents)"
                ),
                {"schema": SCHEMA, "parents": list(PARTITIONED)},
            )
            out = []
            for (name,) in rows:
                m = _PART.match(name)
                if m and m.group(1) in PARTITIONED:
                    out.append((m.group(1), name, datetime.strptime(m.group(2), "%Y%m%d").date()))
            return sorted(out, key=lambda x: (x[0], x[2]))

    async def drop_expired(self) -> list[str]:
        """Drop every partition wholly older than the retention; the names dropped."""
        cutoff = self.clock() - self.retention
        dropped = []
        for table, name, day in await self.partitions():
            end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
            if end > cutoff:
                continue
            async with self.db.session() as s:
                await s.execute(text(f"DROP TABLE IF EXISTS {SCHEMA}.{name}"))
            self._made.discard((table, day))
            dropped.append(name)
        if dropped:
            log.info("telemetry retention dropped %s", ", ".join(dropped))
        return dropped

    async def drop_instance(self, instance_id: str) -> None:
        """Everything of one instance, when it is destroyed (its telemetry and tokens)."""
        async with self.db.session() as s:
            for table in (*PARTITIONED, "telemetry_tokens"):
                await s.execute(
                    text(f"DELETE FROM {SCHEMA}.{table} WHERE instance_id = :i"), {"i": instance_id}
                )
