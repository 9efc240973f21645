"""The databases service process: `python -m services.databases.main`.

Serves DatabaseService (the /v2 database routes, ResolveDatabase), its EventStreamService,
LeaseService (the PG Gateway's leases), AutoscalerService (RequestHandoff, the gateways' control
stream) and the internal TenantResourcesService, and runs the reconciler's loops:
resume/reconcile, the compute monitor, idle stop, storage measurement, the credentials-rotation
follower and the autoscaler's policy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import ColumnElement, Table, and_, func

from libs.grpc_server import AuditSink, Service
from libs.outbox import Outbox
from libs.service_main import Runtime, remote_audit_sink, run
from libs.tenant_resources import Count, Spec, register_resources
from services.databases import servicer
from services.databases.actions.handoff import HandoffConfig
from services.databases.autoscaler import Autoscaler, HandoffDomain, PolicyConfig
from services.databases.compute import make_driver
from services.databases.compute.profiles import PROFILES
from services.databases.control import ControlBus
from services.databases.domain import DatabasesDomain, LeaseDomain
from services.databases.lifecycle import Lifecycle
from services.databases.models import SCHEMA, compute_runs, databases, leases, outbox
from services.databases.peers import Accounts


def _period_start() -> ColumnElement[Any]:
    """The start of this UTC calendar month (the billing period accounts reports)."""
    return func.timezone("UTC", func.date_trunc("month", func.timezone("UTC", func.now())))


def _cu_millihours(t: Table) -> ColumnElement[Any]:
    """CU·h * 1000 of the run intervals this period (a run still open counts until now)."""
    end = func.coalesce(t.c.ended_at, func.now())
    seconds = func.extract("epoch", end - func.greatest(t.c.started_at, _period_start()))
    return func.coalesce(func.sum(t.c.cu * seconds / 3.6), 0)


def _usage(name: str) -> Count:
    return Count(
        f"compute_cu_millihours_{name}",
        compute_runs,
        aggregate=_cu_millihours,
        where=lambda t: and_(t.c.profile == name, func.coalesce(t.c.ended_at, func.now()) > _period_start()),
    )


def spec(purge_hook: Callable[[str], Awaitable[bool]]) -> Spec:
    return Spec(
        counts=[
            Count("databases", databases, where=lambda t: t.c.state != "deleting"),
            Count(
                "storage_bytes", databases, aggregate=lambda t: func.coalesce(func.sum(t.c.storage_bytes), 0)
            ),
            *(_usage(name) for name in PROFILES),
        ],
        # Children first; computes and storage are gone by then (before_purge).
        purge=[leases, compute_runs, databases],
        stats=[
            Count("databases", databases),
            Count("running_databases", databases, where=lambda t: t.c.state == "ready"),
            Count(
                "active_connections",
                databases,
                aggregate=lambda t: func.coalesce(func.sum(t.c.active_connections), 0),
            ),
        ],
        before_purge=purge_hook,
    )


async def build(rt: Runtime) -> tuple[Service, AuditSink | None]:
    accounts = Accounts(rt.channels, rt.signer)
    events = Outbox(outbox, rt.db)
    driver = make_driver(rt.settings)
    st = rt.settings
    bus = ControlBus()
    lifecycle = Lifecycle(
        rt.db,
        driver,
        accounts,
        events,
        idle_timeout=st.idle_timeout,
        handoff=HandoffConfig(
            freeze_timeout=st.handoff_freeze_timeout,
            drain_timeout=st.handoff_drain_timeout,
            start_timeout=st.handoff_start_timeout,
            cooldown=st.autoscale_cooldown,
        ),
        bus=bus,
    )
    dbs = DatabasesDomain(rt.db, accounts, events, lifecycle)
    lease_domain = LeaseDomain(rt.db, accounts, lifecycle)
    handoffs = HandoffDomain(rt.db, accounts, lifecycle, st.autoscale_max_profile)
    autoscaler = Autoscaler(
        lifecycle,
        handoffs,
        PolicyConfig(
            interval=st.autoscale_interval,
            window=st.autoscale_window,
            cpu_up=st.autoscale_cpu_up,
            cpu_down=st.autoscale_cpu_down,
            waits_up=st.autoscale_waits_up,
            max_profile=st.autoscale_max_profile,
            enabled=st.autoscale_enabled,
        ),
    )

    def register(server: grpc.aio.Server) -> list[str]:
        return [
            *servicer.register(server, dbs, lease_domain, handoffs, bus),
            *register_resources(server, rt.db, spec(dbs.purge_tenant)),
        ]

    service = Service(
        name="databases",
        register=register,
        on_stop=lifecycle.shutdown,
        events=events,
        background=[
            lifecycle.reconcile_loop,
            lifecycle.monitor_loop,
            lifecycle.idle_loop,
            lifecycle.storage_loop,
            lifecycle.credentials_loop,
            autoscaler.loop,
        ],
    )
    return service, remote_audit_sink(rt)


if __name__ == "__main__":
    run("databases", SCHEMA, Path(__file__).parent / "migrations", build)
