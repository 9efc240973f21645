"""The engines behind instances as the platform sees them: probed on an interval (which registers
an engine that answers for the first time), recorded in `providers` for the tenant stats, and
listed with their instance counts for platform operators (/v1/admin/providers)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from libs.db import Database
from libs.errors import PermissionDenied
from libs.principal import Principal, is_global
from libs.reconcile import every
from services.instances import metrics
from services.instances import repository as repo
from services.instances.providers import Registry
from services.instances.repository import now

log = logging.getLogger("ctrlmesh.instances")

# Every engine here runs on this host; a multi-region registry would carry it per provider.
REGION = "local"


@dataclass(frozen=True)
class ProviderStatus:
    name: str
    region: str
    healthy: bool
    instances: int
    capabilities: list[str]


class ProvidersDomain:
    def __init__(self, db: Database, registry: Registry, *, probe_interval: float):
        self.db = db
        self.registry = registry
        self.probe_interval = probe_interval

    async def record(self) -> None:
        """Probe every configured engine and store what it answered."""
        health = await self.registry.probe()
        async with self.db.session() as s:
            for name in self.registry.configured:
                h = health[name]
                await repo.upsert_provider(
                    s,
                    {
                        "name": name,
                        "region": REGION,
                        "healthy": h.healthy,
                        "message": h.message,
                        "capabilities": list(self.registry.capabilities(name)),
                        "checked_at": now(),
                    },
                )
            await metrics.observe(s, self.registry.configured, {n: h.healthy for n, h in health.items()})

    async def start(self) -> None:
        """At start-up, before the RPCs: register the engines that are there now."""
        await self.record()
        log.info("instance providers registered: %s", ", ".join(self.registry.names) or "none")

    async def probe_loop(self) -> None:
        await every("provider probe", self.probe_interval, self.record, jitter=0)

    async def list(self, p: Principal) -> list[ProviderStatus]:
        """Every configured engine, pinged now, with its count of live instances."""
        if not is_global(p):
            raise PermissionDenied("admin routes need a global key")
        health = await self.registry.probe()
        async with self.db.session() as s:
            counts = await repo.count_by_provider(s)
        return [
            ProviderStatus(
                name=name,
                region=REGION,
                healthy=health[name].healthy if name in health else False,
                instances=counts.get(name, 0),
                capabilities=list(self.registry.capabilities(name)),
            )
            for name in self.registry.configured
        ]

    async def close(self) -> None:
        await self.registry.close()
