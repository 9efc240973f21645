"""Instance lifecycle: create, read, change and delete instances, with tenant scoping, quotas and
suspension. Plain Python over SQLAlchemy sessions; no gRPC here.

Every change is recorded as desired state and answered at once with the instance in its
transitional state; the reconciler (reconciler.py) drives the engine there. Quota decisions take
a per-tenant advisory lock, so concurrent creates and scales cannot together exceed a quota.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from libs import ids
from libs.db import Database
from libs.errors import (
    InvalidArgument,
    InvalidState,
    PermissionDenied,
    QuotaExceeded,
    Unavailable,
    not_found,
)
from libs.outbox import Outbox
from libs.pagination import decode_cursor, next_page, page_limit
from libs.principal import Principal, is_global, is_system
from services.instances import repository as repo
from services.instances import specs
from services.instances.placement import Placement
from services.instances.providers import Registry
from services.instances.providers.base import Replica
from services.instances.repository import Instance, Scope, Values, now
from services.instances.tenants import Limits, Tenants

log = logging.getLogger("ctrlmesh.instances")

# Where the follower of accounts' `tenant.suspended` events stands (a row of `cursors`).
SUSPENSION_CURSOR = "accounts.tenant_suspended"

# Upstream event names for state changes (ctrlplane's instance.* events).
STATE_EVENTS = {"running": "instance.started", "stopped": "instance.stopped", "failed": "instance.failed"}


T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_cursor: str
    total: int


def event_data(row: Instance) -> dict[str, Any]:
    return {
        "id": row.id,
        "tenant_id": row.tenant_id,
        "name": row.name,
        "state": row.state,
        "provider_name": row.provider_name,
        "cluster_id": row.cluster_id,
        "current_release": row.current_release,
    }


def check_quota(limits: Limits, used: dict[str, int], add: dict[str, int]) -> None:
    """Refuse when an increase would pass a cap (0 = no cap). Decreases are always allowed."""
    caps = {
        "instances": ("max_instances", limits.max_instances),
        "cpu_millis": ("max_cpu_millis", limits.max_cpu_millis),
        "memory_mb": ("max_memory_mb", limits.max_memory_mb),
        "disk_mb": ("max_disk_mb", limits.max_disk_mb),
    }
    for key, (quota, cap) in caps.items():
        want = add.get(key, 0)
        if cap and want > 0 and used.get(key, 0) + want > cap:
            raise QuotaExceeded(
                f"quota {quota} of {cap} would be exceeded: {used.get(key, 0)} in use, {want} more requested",
                details={"quota": quota, "limit": cap, "used": used.get(key, 0), "requested": want},
            )


def ensure_not_suspended(row: Instance) -> None:
    if row.suspended_at is not None:
        raise InvalidState(
            f"instance {row.id!r} is suspended; unsuspend it first", details={"state": row.state}
        )


class InstancesDomain:
    def __init__(
        self,
        db: Database,
        registry: Registry,
        tenants: Tenants,
        outbox: Outbox,
        wake: Callable[[], None],
        clusters: Placement | None = None,
    ):
        """`clusters`: the registry of engines an instance is placed on (None: the configured
        engine only, as before the registry)."""
        self.db = db
        self.registry = registry
        self.clusters = clusters
        self.tenants = tenants
        self.outbox = outbox
        self.wake = wake

    # -- shared helpers ----------------------------------------------------------------------

    async def publish(self, s: AsyncSession, type_: str, row: Instance, **extra: Any) -> None:
        await self.outbox.publish(
            s,
            type_,
            resource="instance",
            resource_id=row.id,
            tenant_id=row.tenant_id,
            account_id=row.account_id,
            data={**event_data(row), **extra},
        )

    async def transition(self, s: AsyncSession, row: Instance, state: str, **values: Any) -> bool:
        """Move an instance to `state` if it is still where `row` saw it; records the events."""
        if not specs.can_transition(row.state, state):
            raise InvalidState(
                f"instance {row.id!r} cannot go from {row.state} to {state}",
                details={"state": row.state, "target": state},
            )
        if not await repo.update_instance(
            s,
            Scope.tenant(row.tenant_id),
            row.id,
            {"state": state, **values},
            expect_state=row.state,
        ):
            return False
        new = replace(row, state=state, **values)
        await self.publish(s, "instance.state_changed", new, previous_state=row.state)
        if state in STATE_EVENTS:
            await self.publish(s, STATE_EVENTS[state], new)
        return True

    async def load(self, s: AsyncSession, p: Principal, instance_id: str, *, lock: bool = False) -> Instance:
        row = await repo.get_instance(s, Scope.of(p), instance_id, lock=lock)
        if row is None:
            raise not_found("instance", instance_id)
        return row

    async def writable(self, p: Principal, tenant_id: str) -> Limits | None:
        """Refuse writes in a suspended tenant (platform operators may still clean up)."""
        if is_system(p):
            return None
        limits = await self.tenants.limits(p, tenant_id)
        if limits.suspended and not is_global(p):
            raise PermissionDenied(
                "the tenant is suspended; its instances are read-only", details={"tenant_id": tenant_id}
            )
        return limits

    def _target_tenant(self, p: Principal, tenant_id: str) -> str:
        if p.scope == "tenant":
            if tenant_id and tenant_id != p.tenant_id:
                raise not_found("tenant", tenant_id)
            return p.tenant_id
        if not tenant_id:
            raise InvalidArgument(
                "tenant_id is required with a global or account key",
                fields={"tenant_id": "required for this key"},
            )
        return tenant_id

    # -- create and read ---------------------------------------------------------------------

    async def create(
        self,
        p: Principal,
        *,
        tenant_id: str,
        name: str,
        provider_name: str,
        services: list[dict[str, Any]],
        replicas: int,
        labels: dict[str, str],
        cluster_id: str = "",
    ) -> Instance:
        target = self._target_tenant(p, tenant_id)
        limits = await self.tenants.limits(p, target)
        if limits.suspended:
            raise PermissionDenied(
                "the tenant is suspended; it cannot create instances", details={"tenant_id": target}
            )
        provider, cluster_id = await self._place(provider_name, cluster_id)
        per = specs.per_replica(services)
        main = specs.main_service(services)
        t = now()
        instance_id, release_id = ids.new_id("inst"), ids.new_id("rel")
        values: Values = {
            "id": instance_id,
            "tenant_id": limits.tenant_id,
            "account_id": limits.account_id,
            "name": name,
            "slug": specs.slugify(name),
            "provider_name": provider,
            "cluster_id": cluster_id,
            "state": "provisioning",
            "desired_state": "running",
            "image": main["image"],
            **per,
            "replicas": replicas,
            "spec": {"services": services},
            "labels": labels,
            "suspended_at": None,
            "suspend_reason": "",
            "current_release": release_id,
            "endpoints": [],
            "generation": 0,
            "observed_generation": 0,
            "last_error": "",
            "created_at": t,
            "updated_at": t,
        }
        async with self.outbox.session() as s:
            await repo.lock_tenant(s, limits.tenant_id)
            used = await repo.tenant_usage(s, limits.tenant_id)
            check_quota(limits, used, {"instances": 1, **{k: v * replicas for k, v in per.items()}})
            row = await repo.insert_instance(s, values)
            # The first release is what the instance was created with, so it can be rolled back to.
            await repo.insert_release(
                s,
                {
                    "id": release_id,
                    "tenant_id": limits.tenant_id,
                    "instance_id": instance_id,
                    "version": 1,
                    "snapshot": {"services": services, "replicas": replicas},
                    "notes": "initial provisioning",
                    "commit_sha": "",
                    "active": True,
                    "created_at": t,
                },
            )
            await self.publish(s, "instance.created", row)
        self.wake()
        return row

    async def _place(self, provider_name: str, cluster_id: str) -> tuple[str, str]:
        """(provider key, cluster id) of a new instance, from the clusters registry: the named
        cluster (404 when there is none), else the default cluster of the provider (`main`,
        the configured engine). Without the clusters service an unnamed cluster is the
        configured engine's (''); a named one cannot be checked: 503."""
        if self.clusters is None:
            if cluster_id:
                raise InvalidArgument(
                    "this platform places instances on its configured engine only",
                    fields={"cluster_id": "no clusters registry here"},
                )
            return self.registry.resolve(provider_name), ""
        try:
            ref = await self.clusters.resolve(cluster_id)
        except Unavailable:
            if cluster_id:
                raise
            log.warning("the clusters registry does not answer: placing on the configured engine")
            return self.registry.resolve(provider_name), ""
        self.registry.learn(ref.id, ref.endpoint, default=not cluster_id)
        kinds = self.registry.cluster_kinds(ref.id, ref.type)
        if self.registry.on_configured(ref.id):
            return self.registry.resolve(provider_name), ref.id
        if provider_name and provider_name not in kinds:
            raise InvalidArgument(
                f"cluster {ref.name!r} ({ref.type}) runs the {' or '.join(kinds)} provider, not {provider_name!r}",
                fields={"provider_name": f"cluster {ref.name!r} runs {', '.join(kinds)}"},
            )
        return provider_name or kinds[0], ref.id

    async def get(self, p: Principal, instance_id: str) -> Instance:
        return await self.db.read(lambda s: self.load(s, p, instance_id))

    async def live_replicas(self, p: Principal, instance_id: str) -> tuple[Instance, list[Replica]]:
        """Internal (the ingress): the instance and its running replicas as the engine reports
        them now, of every release (none while its engine is away), less those a rollout is
        draining before it stops them."""
        if not is_system(p):
            raise PermissionDenied("internal RPC")
        row = await self.get(p, instance_id)
        if not self.registry.has(row.provider_name, row.cluster_id):
            return row, []
        async with self.db.session() as s:
            dep = await repo.in_flight_deployment(s, Scope.system(), instance_id)
        leaving = set(dep.progress.get("leaving") or ()) if dep is not None else set()
        reps = await self.registry.get(row.provider_name, row.cluster_id).replicas(instance_id)
        return row, [r for r in reps if r.running and r.slot not in leaving]

    async def find(
        self, p: Principal, *, state: str, label: str, provider: str, tenant_id: str, cursor: str, limit: int
    ) -> Page[Instance]:
        after = decode_cursor(cursor)
        n = page_limit(limit)
        pair = None
        if label:
            k, _, v = label.partition("=")
            pair = (k, v)
        rows, total = await self.db.read(
            lambda s: repo.list_instances(
                s,
                Scope.of(p),
                state=state,
                label=pair,
                provider=provider,
                tenant_id=tenant_id,
                after=after,
                limit=n,
            )
        )
        return Page(*next_page(rows, n, lambda r: r.id), total)

    # -- changes -----------------------------------------------------------------------------

    async def update(
        self,
        p: Principal,
        instance_id: str,
        *,
        name: str | None,
        labels: dict[str, str],
        services: list[dict[str, Any]],
    ) -> Instance:
        if services:
            raise InvalidArgument(
                "services change through a deployment (POST /v1/instances/{id}/deploy), not PATCH",
                fields={"services": "use deploy"},
            )
        row = await self.get(p, instance_id)
        await self.writable(p, row.tenant_id)
        values: dict[str, Any] = {}
        if name is not None:
            values.update(name=name, slug=specs.slugify(name))
        if labels:
            values["labels"] = labels
        async with self.outbox.session() as s:
            row = await self.load(s, p, instance_id, lock=True)
            if values:
                await repo.update_instance(s, Scope.of(p), instance_id, values)
                row = replace(row, **values, updated_at=now())
                await self.publish(s, "instance.updated", row)
        return row

    async def _act(
        self, p: Principal, instance_id: str, action: Callable[[AsyncSession, Instance], Any]
    ) -> Instance:
        """Common frame of the state-changing actions: visibility, suspension of the tenant, the
        row lock, the action, then wake the reconciler."""
        row = await self.get(p, instance_id)
        await self.writable(p, row.tenant_id)
        async with self.outbox.session() as s:
            row = await self.load(s, p, instance_id, lock=True)
            await action(s, row)
        self.wake()
        return await self.get(p, instance_id)

    async def start(self, p: Principal, instance_id: str) -> Instance:
        async def act(s: AsyncSession, row: Instance) -> None:
            ensure_not_suspended(row)
            if row.state in ("provisioning", "stopping"):
                # Recorded; the reconciler starts it once provisioned, or once it has stopped.
                await repo.update_instance(
                    s, Scope.tenant(row.tenant_id), row.id, {"desired_state": "running"}
                )
                return
            if row.state not in ("stopped", "failed"):
                raise InvalidState(
                    f"instance {row.id!r} is {row.state}; start needs provisioning, stopping, stopped or failed",
                    details={"state": row.state},
                )
            await self.transition(s, row, "starting", desired_state="running", last_error="")

        return await self._act(p, instance_id, act)

    async def stop(self, p: Principal, instance_id: str) -> Instance:
        async def act(s: AsyncSession, row: Instance) -> None:
            ensure_not_suspended(row)
            if row.state != "running":
                raise InvalidState(
                    f"instance {row.id!r} is {row.state}; stop needs running",
                    details={"state": row.state},
                )
            await self._cancel_in_flight(s, row)
            await self.transition(s, row, "stopping", desired_state="stopped")

        return await self._act(p, instance_id, act)

    async def restart(self, p: Principal, instance_id: str) -> Instance:
        async def act(s: AsyncSession, row: Instance) -> None:
            ensure_not_suspended(row)
            if row.state == "running":
                # Down and up again: stopping, then the reconciler starts it (desired running).
                await self.transition(s, row, "stopping", desired_state="running")
            elif row.state == "stopping":
                # Already on its way down: up again once it is stopped.
                await repo.update_instance(
                    s, Scope.tenant(row.tenant_id), row.id, {"desired_state": "running"}
                )
            elif row.state in ("stopped", "failed"):
                await self.transition(s, row, "starting", desired_state="running", last_error="")
            else:
                raise InvalidState(
                    f"instance {row.id!r} is {row.state}; restart needs running, stopping, stopped or failed",
                    details={"state": row.state},
                )
            await self.publish(s, "instance.restarted", row)

        return await self._act(p, instance_id, act)

    async def scale(
        self, p: Principal, instance_id: str, *, resources: dict[str, int], replicas: int | None
    ) -> Instance:
        row = await self.get(p, instance_id)
        limits = await self.writable(p, row.tenant_id)

        async def act(s: AsyncSession, row: Instance) -> None:
            ensure_not_suspended(row)
            if row.state not in ("running", "stopped", "failed"):
                raise InvalidState(
                    f"instance {row.id!r} is {row.state}; scale needs running, stopped or failed",
                    details={"state": row.state},
                )
            if await repo.in_flight_deployment(s, Scope.tenant(row.tenant_id), row.id):
                raise InvalidState(
                    "a deployment is in progress; scale after it finishes", details={"state": row.state}
                )
            services = [dict(x, resources=dict(x["resources"])) for x in row.spec["services"]]
            main = specs.main_service(services)
            for k in ("cpu_millis", "memory_mb", "disk_mb"):
                if resources.get(k):
                    main["resources"][k] = int(resources[k])
            n = row.replicas if replicas is None else replicas
            per = specs.per_replica(services)
            await repo.lock_tenant(s, row.tenant_id)
            if limits is not None:
                used = await repo.tenant_usage(s, row.tenant_id)
                check_quota(limits, used, {k: per[k] * n - getattr(row, k) * row.replicas for k in per})
            values: Values = {"spec": {**row.spec, "services": services}, **per, "replicas": n}
            if row.state == "running":
                values["generation"] = row.generation + 1
            await repo.update_instance(s, Scope.tenant(row.tenant_id), row.id, values)
            await self.publish(
                s, "instance.scaled", replace(row, **values), replicas=n, resources=main["resources"]
            )

        return await self._act(p, instance_id, act)

    async def suspend(self, p: Principal, instance_id: str, reason: str) -> Instance:
        async def act(s: AsyncSession, row: Instance) -> None:
            if row.suspended_at is not None:
                raise InvalidState(f"instance {row.id!r} is already suspended", details={"state": row.state})
            if row.state not in ("running", "stopped", "failed"):
                raise InvalidState(
                    f"instance {row.id!r} is {row.state}; suspend needs running, stopped or failed",
                    details={"state": row.state},
                )
            values: Values = {"suspended_at": now(), "suspend_reason": reason, "desired_state": "stopped"}
            await self._cancel_in_flight(s, row)
            if row.state == "running":
                await self.transition(s, row, "stopping", **values)
            else:
                await repo.update_instance(s, Scope.tenant(row.tenant_id), row.id, values)
            await self.publish(s, "instance.suspended", replace(row, **values), reason=reason)

        return await self._act(p, instance_id, act)

    async def unsuspend(self, p: Principal, instance_id: str, reason: str) -> Instance:
        async def act(s: AsyncSession, row: Instance) -> None:
            if row.suspended_at is None:
                raise InvalidState(f"instance {row.id!r} is not suspended", details={"state": row.state})
            values: Values = {"suspended_at": None, "suspend_reason": "", "desired_state": "running"}
            if row.state in ("stopped", "failed"):
                await self.transition(s, row, "starting", last_error="", **values)
            else:
                await repo.update_instance(s, Scope.tenant(row.tenant_id), row.id, values)
            await self.publish(s, "instance.unsuspended", replace(row, **values), reason=reason)

        return await self._act(p, instance_id, act)

    async def delete(self, p: Principal, instance_id: str) -> Instance:
        async def act(s: AsyncSession, row: Instance) -> None:
            if row.state in ("destroying", "destroyed"):
                return
            await self._cancel_in_flight(s, row)
            # Convergent: from any state; the reconciler removes whatever the engine holds.
            await repo.update_instance(
                s,
                Scope.tenant(row.tenant_id),
                row.id,
                {"state": "destroying", "desired_state": "destroyed"},
            )
            await self.publish(
                s, "instance.state_changed", replace(row, state="destroying"), previous_state=row.state
            )

        return await self._act(p, instance_id, act)

    async def _cancel_in_flight(self, s: AsyncSession, row: Instance) -> None:
        scope = Scope.tenant(row.tenant_id)
        dep = await repo.in_flight_deployment(s, scope, row.id)
        if dep is not None:
            await repo.update_deployment(s, scope, dep.id, {"cancel_requested": True})

    # -- the tenant's lifecycle in accounts ---------------------------------------------------

    async def purge_tenant(self, tenant_id: str) -> bool:
        """Accounts deletes a tenant: delete its instances first; done once all are gone."""
        scope = Scope.tenant(tenant_id)
        async with self.db.session() as s:
            rows = await repo.tenant_instances(s, tenant_id)
            for row in rows:
                if row.state != "destroying":
                    await repo.update_instance(
                        s, scope, row.id, {"state": "destroying", "desired_state": "destroyed"}
                    )
        self.wake()
        return not rows

    async def follow_suspensions(self) -> None:
        """Stop the instances of each tenant accounts suspends, resuming after the last event
        handled (by this or an earlier process)."""
        await self.tenants.watch_suspensions(self._load_cursor, self._save_cursor, self._suspended)

    async def _load_cursor(self) -> int | None:
        async with self.db.session() as s:
            return await repo.get_cursor(s, SUSPENSION_CURSOR)

    async def _save_cursor(self, value: int) -> None:
        async with self.db.session() as s:
            await repo.set_cursor(s, SUSPENSION_CURSOR, value)

    async def _suspended(self, tenant_id: str) -> None:
        stopped = await self.on_tenant_suspended(tenant_id)
        log.info("tenant %s suspended: stopping %d instance(s)", tenant_id, stopped)

    async def on_tenant_suspended(self, tenant_id: str) -> int:
        """Stop every instance of a suspended tenant (they stay stopped after unsuspend)."""
        stopped = 0
        async with self.outbox.session() as s:
            for row in await repo.tenant_instances(s, tenant_id):
                if row.state in ("destroying", "destroyed", "stopped", "stopping", "failed"):
                    continue
                await self._cancel_in_flight(s, row)
                if row.state == "running":
                    await self.transition(s, row, "stopping", desired_state="stopped")
                else:
                    await repo.update_instance(
                        s, Scope.tenant(row.tenant_id), row.id, {"desired_state": "stopped"}
                    )
                await self.publish(s, "instance.tenant_suspended", row)
                stopped += 1
        self.wake()
        return stopped
