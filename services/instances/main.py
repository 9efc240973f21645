"""The instances service process: `python -m services.instances.main`.

Besides the RPCs it runs four loops: the reconciler (engine toward desired state, deployments
included), the health runner, the provider probe (registers engines that answer, records their
health for /v1/admin/providers and stats), and the consumer of accounts' `tenant.suspended`
events, which stops the instances of a suspended tenant.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from sqlalchemy import func

from libs.grpc_server import AuditSink, Service
from libs.outbox import Outbox
from libs.service_main import Runtime, remote_audit_sink, run
from libs.tenant_resources import Count, Spec, register_resources
from services.instances import repository as repo
from services.instances import servicer
from services.instances.deploys import DeploymentsDomain, Executor
from services.instances.domain import InstancesDomain
from services.instances.health import HealthDomain, Hub, Runner
from services.instances.models import (
    SCHEMA,
    deployments,
    health_checks,
    health_results,
    instance_health,
    instances,
    outbox,
    providers,
    releases,
)
from services.instances.providers import Registry
from services.instances.reconciler import Reconciler
from services.instances.repository import now
from services.instances.telemetry import TelemetryDomain
from services.instances.tenants import Tenants

log = logging.getLogger("ctrlmesh.instances")

SUSPENSION_CURSOR = "accounts.tenant_suspended"


def _live(t):  # type: ignore[no-untyped-def]
    return t.c.state.notin_(("destroyed",))


def _sum(col: str):  # type: ignore[no-untyped-def]
    return lambda t: func.coalesce(func.sum(t.c[col] * t.c.replicas), 0)


def spec(before_purge):  # type: ignore[no-untyped-def]
    return Spec(
        counts=[
            Count("instances", instances, where=_live),
            Count("cpu_millis", instances, aggregate=_sum("cpu_millis"), where=_live),
            Count("memory_mb", instances, aggregate=_sum("memory_mb"), where=_live),
            Count("disk_mb", instances, aggregate=_sum("disk_mb"), where=_live),
        ],
        purge=[health_results, health_checks, instance_health, deployments, releases, instances],
        stats=[
            Count("instances", instances, where=_live),
            Count("running_instances", instances, where=lambda t: t.c.state == "running"),
            Count("providers", providers),
            Count("healthy_providers", providers, where=lambda t: t.c.healthy),
        ],
        before_purge=before_purge,
    )


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    s = rt.settings
    registry = Registry(s)
    box = Outbox(outbox, rt.db)
    tenants = Tenants(rt.channels, rt.signer)
    reconciler_ref: list[Reconciler] = []
    domain = InstancesDomain(rt.db, registry, tenants, box, wake=lambda: reconciler_ref[0].wake())
    hub = Hub()
    health = HealthDomain(rt.db, domain, registry, box, hub)
    deploys = DeploymentsDomain(rt.db, domain, box)
    executor = Executor(
        rt.db,
        domain,
        box,
        gate_timeout=s.deploy_health_timeout.total_seconds(),
        settle=s.deploy_settle.total_seconds(),
    )
    reconciler = Reconciler(rt.db, domain, registry, executor)
    reconciler_ref.append(reconciler)
    telemetry = TelemetryDomain(rt.db, domain, health, registry)

    async def counts() -> dict[str, int]:
        async with rt.db.session() as sess:
            return await repo.count_by_provider(sess)

    async def record_providers() -> None:
        health_now = await registry.probe()
        async with rt.db.session() as sess:
            for name in registry.configured:
                h = health_now[name]
                await repo.upsert_provider(
                    sess,
                    {
                        "name": name,
                        "region": "local",
                        "healthy": h.healthy,
                        "message": h.message,
                        "capabilities": list(registry.capabilities(name)),
                        "checked_at": now(),
                    },
                )

    async def probe_loop() -> None:
        while True:
            await asyncio.sleep(s.provider_probe_interval.total_seconds())
            try:
                await record_providers()
            except Exception:
                log.warning("provider probe failed", exc_info=True)

    async def before_purge(tenant_id: str) -> bool:
        """Accounts deletes a tenant: delete its instances first; done once all are gone."""
        async with rt.db.session() as sess:
            rows = await repo.tenant_instances(sess, tenant_id)
            for row in rows:
                if row["state"] != "destroying":
                    await repo.update_instance(
                        sess, row["id"], {"state": "destroying", "desired_state": "destroyed"}
                    )
        reconciler.wake()
        return not rows

    async def load_cursor() -> int | None:
        async with rt.db.session() as sess:
            return await repo.get_cursor(sess, SUSPENSION_CURSOR)

    async def save_cursor(value: int) -> None:
        async with rt.db.session() as sess:
            await repo.set_cursor(sess, SUSPENSION_CURSOR, value)

    async def on_suspended(tenant_id: str) -> None:
        stopped = await domain.on_tenant_suspended(tenant_id)
        log.info("tenant %s suspended: stopping %d instance(s)", tenant_id, stopped)

    async def suspensions() -> None:
        await tenants.watch_suspensions(load_cursor, save_cursor, on_suspended)

    async def on_start() -> None:
        await record_providers()
        log.info("instance providers registered: %s", ", ".join(registry.names) or "none")

    async def on_stop() -> None:
        await reconciler.shutdown()  # its claims go at once: another process takes over
        await registry.close()

    services = (
        servicer.InstanceService(domain),
        servicer.DeploymentService(deploys),
        servicer.HealthService(health),
        servicer.TelemetryService(telemetry),
        servicer.ProviderService(registry, counts),
    )

    def register(server):  # type: ignore[no-untyped-def]
        return [*servicer.register(server, *services), *register_resources(server, rt.db, spec(before_purge))]

    service = Service(
        name="instances",
        register=register,
        on_start=on_start,
        on_stop=on_stop,
        events=box,
        background=[reconciler.run, Runner(health, rt.db).run, probe_loop, suspensions],
    )
    return service, remote_audit_sink(rt)


if __name__ == "__main__":
    run("instances", SCHEMA, Path(__file__).parent / "migrations", build)
