"""The instances service process: `python -m services.instances.main`.

Besides the RPCs it runs four loops: the reconciler (engine toward desired state, deployments
included), the health runner, the provider probe (registers engines that answer, records their
health for /v1/admin/providers and stats), and the consumer of accounts' `tenant.suspended`
events, which stops the instances of a suspended tenant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import ColumnElement, Table, func

from libs.grpc_server import AuditSink, Service
from libs.outbox import Outbox
from libs.service_main import Runtime, remote_audit_sink, run
from libs.tenant_resources import Count, Spec, register_resources
from services.instances import servicer
from services.instances.deployments import DeploymentsDomain
from services.instances.domain import InstancesDomain
from services.instances.executor import Executor
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
from services.instances.otlp import Telemetry
from services.instances.placement import Placement
from services.instances.provider_status import ProvidersDomain
from services.instances.providers import Registry
from services.instances.reconciler import Reconciler
from services.instances.secrets_client import SecretsClient
from services.instances.telemetry import TelemetryDomain
from services.instances.tenants import Tenants


def _live(t: Table) -> ColumnElement[bool]:
    return t.c.state.notin_(("destroyed",))


def _sum(col: str) -> Callable[[Table], ColumnElement[Any]]:
    return lambda t: func.coalesce(func.sum(t.c[col] * t.c.replicas), 0)


def spec(before_purge: Callable[[str], Awaitable[bool]], telemetry: list[Table]) -> Spec:
    return Spec(
        counts=[
            Count("instances", instances, where=_live),
            Count("cpu_millis", instances, aggregate=_sum("cpu_millis"), where=_live),
            Count("memory_mb", instances, aggregate=_sum("memory_mb"), where=_live),
            Count("disk_mb", instances, aggregate=_sum("disk_mb"), where=_live),
        ],
        purge=[*telemetry, health_results, health_checks, instance_health, deployments, releases, instances],
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
    wake = asyncio.Event()
    placement = Placement(rt.channels, rt.signer)
    domain = InstancesDomain(rt.db, registry, tenants, box, wake=wake.set, clusters=placement)
    health = HealthDomain(rt.db, domain, registry, box, Hub())
    deploys = DeploymentsDomain(rt.db, domain, box)
    otlp = Telemetry(rt.db, s)
    executor = Executor(
        rt.db,
        box,
        gate_timeout=s.deploy_health_timeout.total_seconds(),
        settle=s.deploy_settle.total_seconds(),
        drain=s.deploy_drain.total_seconds(),
        secrets=SecretsClient(rt.channels, rt.signer, rt.db),
        rollout_env=otlp.rollout_env,
    )
    reconciler = Reconciler(
        rt.db, domain, registry, executor, wake=wake, placement=placement.blocked, clusters=placement
    )
    telemetry = TelemetryDomain(rt.db, domain, health, registry, otlp)
    otlp.sampler = telemetry.sample_usage
    engines = ProvidersDomain(
        rt.db, registry, probe_interval=s.provider_probe_interval.total_seconds(), clusters=placement
    )

    async def on_stop() -> None:
        await reconciler.shutdown()  # its claims go at once: another process takes over
        await engines.close()

    services = (
        servicer.InstanceService(domain),
        servicer.DeploymentService(deploys),
        servicer.HealthService(health),
        servicer.TelemetryService(telemetry),
        servicer.ProviderService(engines),
    )

    def register(server: grpc.aio.Server) -> list[str]:
        return [
            *servicer.register(server, *services),
            *register_resources(server, rt.db, spec(domain.purge_tenant, otlp.tables)),
        ]

    service = Service(
        name="instances",
        register=register,
        on_start=engines.start,
        on_stop=on_stop,
        events=box,
        background=[
            reconciler.run,
            Runner(health, rt.db).run,
            engines.probe_loop,
            domain.follow_suspensions,
            *otlp.background(),
        ],
    )
    return service, remote_audit_sink(rt)


if __name__ == "__main__":
    run("instances", SCHEMA, Path(__file__).parent / "migrations", build)
