"""The engines behind instances as the platform sees them: probed on an interval (which registers
an engine that answers for the first time), recorded in `providers` for the tenant stats, and
listed with their instance counts for platform operators (/v1/admin/providers).

The list is read from the clusters registry, the one source of truth for which engines exist:
one row per cluster and provider that runs on it (the configured providers on `main`, the
configured engine; `swarm` on a self_managed cluster), each pinged now. With the clusters
service away the list is 503, not a second opinion."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from libs.db import Database
from libs.errors import CtrlmeshError, PermissionDenied
from libs.principal import Principal, is_global
from libs.reconcile import every
from services.instances import metrics
from services.instances import repository as repo
from services.instances.placement import ClusterRef, Placement
from services.instances.providers import Registry
from services.instances.providers.base import ProviderError
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
    cluster_id: str = ""
    cluster_name: str = ""


class ProvidersDomain:
    def __init__(
        self,
        db: Database,
        registry: Registry,
        *,
        probe_interval: float,
        clusters: Placement | None = None,
    ):
        self.db = db
        self.registry = registry
        self.probe_interval = probe_interval
        self.clusters = clusters

    async def learn_clusters(self) -> list[ClusterRef]:
        """Every cluster of the registry, its endpoint taught to the provider registry."""
        assert self.clusters is not None
        known = self.registry.known_clusters()
        refs = await self.clusters.clusters(known)
        for ref in refs:
            # The listing leaves a local engine's endpoint out: a known one keeps what it has.
            if ref.endpoint or ref.id not in known:
                self.registry.learn(ref.id, ref.endpoint, default=ref.name == "main")
        return refs

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
            in_use = await repo.cluster_ids_in_use(s)
        if self.clusters is not None:
            # The engines of the clusters instances run on, learned once (after a restart the
            # health runner and the samplers need them before any reconcile step): one cheap
            # lookup per unknown cluster, not a listing (which reads every engine) per probe.
            for cluster_id in sorted(c for c in in_use if not self.registry.knows(c)):
                try:
                    ref = await self.clusters.resolve(cluster_id)
                except CtrlmeshError as err:
                    log.info("the engine of cluster %s is not known yet: %s", cluster_id, err)
                    continue
                self.registry.learn(ref.id, ref.endpoint, default=ref.name == "main")

    async def start(self) -> None:
        """At start-up, before the RPCs: register the engines that are there now."""
        await self.record()
        log.info("instance providers registered: %s", ", ".join(self.registry.names) or "none")

    async def probe_loop(self) -> None:
        await every("provider probe", self.probe_interval, self.record, jitter=0)

    async def list(self, p: Principal) -> list[ProviderStatus]:
        """Every provider on every cluster of the registry, pinged now, with its count of live
        instances."""
        if not is_global(p):
            raise PermissionDenied("admin routes need a global key")
        health = await self.registry.probe()
        async with self.db.session() as s:
            counts = await repo.count_by_provider(s)
        if self.clusters is None:  # no registry of engines: the configured one alone
            return [
                ProviderStatus(
                    name=name,
                    region=REGION,
                    healthy=health[name].healthy if name in health else False,
                    instances=counts.get((name, ""), 0),
                    capabilities=list(self.registry.capabilities(name)),
                )
                for name in self.registry.configured
            ]
        refs = await self.learn_clusters()

        async def row(ref: ClusterRef, name: str) -> ProviderStatus:
            n = counts.get((name, ref.id), 0)
            if self.registry.on_configured(ref.id):
                healthy = health[name].healthy if name in health else False
                if ref.id == self.registry.default_cluster:
                    n += counts.get((name, ""), 0)  # made before the registry: on `main`
            else:
                try:
                    await self.registry.get(name, ref.id).ping()
                    healthy = True
                except (ProviderError, CtrlmeshError):
                    healthy = False
            return ProviderStatus(
                name=name,
                region=REGION,
                healthy=healthy,
                instances=n,
                capabilities=list(self.registry.capabilities(name)),
                cluster_id=ref.id,
                cluster_name=ref.name,
            )

        return list(
            await asyncio.gather(
                *(row(ref, name) for ref in refs for name in self.registry.cluster_kinds(ref.id, ref.type))
            )
        )

    async def close(self) -> None:
        await self.registry.close()
