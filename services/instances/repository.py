"""SQLAlchemy access to the instances schema. Every read of tenant data takes a `Scope`, so a row
outside the caller's tenants is simply not found. Rows come back frozen (one dataclass per
table, as in databases and accounts); writes take the changed columns as a dict. JSONB columns
(`spec`, `labels`, `endpoints`, `snapshot`, `services`, `progress`) stay plain dicts and lists.
System scans for the reconciler return only keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from libs.db import xact_lock
from libs.principal import Principal, is_global
from libs.timeutil import now
from services.instances.models import (
    cursors,
    deployments,
    health_checks,
    health_results,
    instance_health,
    instances,
    providers,
    releases,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# The columns a write sets.
Values = dict[str, Any]


@dataclass(frozen=True)
class Instance:
    """One `instances` row. The quota columns are what ONE replica takes (models.py)."""

    id: str
    tenant_id: str
    account_id: str
    name: str
    slug: str
    provider_name: str
    state: str
    desired_state: str
    image: str
    cpu_millis: int
    memory_mb: int
    disk_mb: int
    replicas: int
    spec: dict[str, Any]
    labels: dict[str, str]
    suspended_at: datetime | None
    suspend_reason: str
    generation: int
    observed_generation: int
    current_release: str
    endpoints: list[dict[str, Any]]
    last_error: str
    created_at: datetime
    updated_at: datetime
    cluster_id: str = ""


@dataclass(frozen=True)
class Release:
    id: str
    tenant_id: str
    instance_id: str
    version: int
    snapshot: dict[str, Any]
    notes: str
    commit_sha: str
    active: bool
    created_at: datetime
    # Key → version of the secrets it last rolled out with (None before its first rollout).
    secret_versions: dict[str, int] | None = None


@dataclass(frozen=True)
class Deployment:
    id: str
    tenant_id: str
    instance_id: str
    release_id: str
    previous_release_id: str
    state: str
    strategy: str
    is_rollback: bool
    services: list[dict[str, Any]]
    progress: dict[str, Any]
    notes: str
    commit_sha: str
    error: str
    initiator: str
    cancel_requested: bool
    started_at: datetime | None
    finished_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class HealthCheck:
    id: str
    tenant_id: str
    instance_id: str
    name: str
    type: str
    target: str
    interval_s: float
    timeout_s: float
    retries: int
    enabled: bool
    status: str
    consecutive_failures: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class HealthResult:
    id: str
    tenant_id: str
    check_id: str
    instance_id: str
    status: str
    latency_ms: float
    message: str
    status_code: int
    checked_at: datetime


@dataclass(frozen=True)
class ResultStatus:
    """The part of a health result the uptime figures read."""

    status: str
    checked_at: datetime


T = TypeVar("T", bound="DataclassInstance")


def _row(cls: type[T], m: Any) -> T:
    return cls(**{f.name: m[f.name] for f in fields(cls)})


def _maybe(cls: type[T], m: Any) -> T | None:
    return None if m is None else _row(cls, m)


def account_of(instance_id: str) -> ColumnElement[str]:
    """The account of an instance, as a scalar subquery: events about an instance's checks and
    deployments carry its account without a second read."""
    return select(instances.c.account_id).where(instances.c.id == instance_id).scalar_subquery()


@dataclass(frozen=True)
class Scope:
    """The tenants a caller may see: one tenant, every tenant of one account, or all (global
    keys and the service itself)."""

    tenant_id: str | None = None
    account_id: str | None = None

    @classmethod
    def of(cls, p: Principal) -> Scope:
        if is_global(p):
            return cls()
        if p.scope == "account":
            return cls(account_id=p.account_id)
        return cls(tenant_id=p.tenant_id or "\x00")  # a tenant key without a tenant sees nothing

    @classmethod
    def tenant(cls, tenant_id: str) -> Scope:
        return cls(tenant_id=tenant_id)

    @classmethod
    def system(cls) -> Scope:
        return cls()

    def instance_filter(self) -> ColumnElement[bool] | None:
        if self.tenant_id is not None:
            return instances.c.tenant_id == self.tenant_id
        if self.account_id is not None:
            return instances.c.account_id == self.account_id
        return None

    def child_filter(self, t: Table) -> ColumnElement[bool] | None:
        """Children of instances carry the tenant; an account scope goes through the parent."""
        if self.tenant_id is not None:
            return t.c.tenant_id == self.tenant_id
        if self.account_id is not None:
            return t.c.instance_id.in_(
                select(instances.c.id).where(instances.c.account_id == self.account_id)
            )
        return None


def _scoped(q: Any, cond: ColumnElement[bool] | None) -> Any:
    return q if cond is None else q.where(cond)


# -- instances --------------------------------------------------------------------------------


async def get_instance(
    s: AsyncSession, scope: Scope, instance_id: str, *, lock: bool = False
) -> Instance | None:
    q = _scoped(select(instances).where(instances.c.id == instance_id), scope.instance_filter())
    if lock:
        q = q.with_for_update()
    return _maybe(Instance, (await s.execute(q)).mappings().first())


async def list_instances(
    s: AsyncSession,
    scope: Scope,
    *,
    state: str,
    label: tuple[str, str] | None,
    provider: str,
    tenant_id: str,
    after: str | None,
    limit: int,
) -> tuple[list[Instance], int]:
    q = _scoped(select(instances), scope.instance_filter())
    if state:
        q = q.where(instances.c.state == state)
    if label is not None:
        q = q.where(instances.c.labels.contains({label[0]: label[1]}))
    if provider:
        q = q.where(instances.c.provider_name == provider)
    if tenant_id:
        q = q.where(instances.c.tenant_id == tenant_id)
    total = await s.scalar(select(func.count()).select_from(q.subquery())) or 0
    if after:
        q = q.where(instances.c.id < after)
    rows = (await s.execute(q.order_by(instances.c.id.desc()).limit(limit + 1))).mappings().all()
    return [_row(Instance, r) for r in rows], int(total)


async def insert_instance(s: AsyncSession, values: Values) -> Instance:
    return _row(
        Instance, (await s.execute(insert(instances).values(**values).returning(instances))).mappings().one()
    )


async def update_instance(
    s: AsyncSession, scope: Scope, instance_id: str, values: Values, *, expect_state: str | None = None
) -> bool:
    """Conditional on the state when given, so the worker never overwrites a newer decision."""
    q = _scoped(update(instances).where(instances.c.id == instance_id), scope.instance_filter())
    if expect_state is not None:
        q = q.where(instances.c.state == expect_state)
    result = await s.execute(q.values(updated_at=now(), **values))
    return bool(cast(CursorResult[Any], result).rowcount)


async def delete_instance(s: AsyncSession, scope: Scope, instance_id: str) -> None:
    for t in (health_results, health_checks, instance_health, deployments, releases):
        await s.execute(_scoped(delete(t).where(t.c.instance_id == instance_id), scope.child_filter(t)))
    await s.execute(_scoped(delete(instances).where(instances.c.id == instance_id), scope.instance_filter()))


async def lock_tenant(s: AsyncSession, tenant_id: str) -> None:
    """Serialise quota decisions of one tenant until the transaction ends."""
    await xact_lock(s, "quota", tenant_id)


async def tenant_usage(s: AsyncSession, tenant_id: str, *, exclude: str = "") -> dict[str, int]:
    t = instances
    q = select(
        func.count(),
        func.coalesce(func.sum(t.c.cpu_millis * t.c.replicas), 0),
        func.coalesce(func.sum(t.c.memory_mb * t.c.replicas), 0),
        func.coalesce(func.sum(t.c.disk_mb * t.c.replicas), 0),
    ).where(t.c.tenant_id == tenant_id, t.c.state != "destroyed")
    if exclude:
        q = q.where(t.c.id != exclude)
    n, cpu, mem, disk = (await s.execute(q)).one()
    return {"instances": int(n), "cpu_millis": int(cpu), "memory_mb": int(mem), "disk_mb": int(disk)}


async def instances_needing_work(s: AsyncSession) -> list[str]:
    """Ids of the instances the reconciler has work for (a system scan: keys only)."""
    t = instances
    q = select(t.c.id).where(
        t.c.state.in_(("provisioning", "starting", "stopping", "destroying"))
        | ((t.c.state == "running") & (t.c.desired_state != "running"))
        | ((t.c.state == "running") & (t.c.generation != t.c.observed_generation))
        | t.c.id.in_(select(deployments.c.instance_id).where(deployments.c.state.in_(("pending", "running"))))
    )
    return list((await s.execute(q)).scalars().all())


async def tenant_instances(s: AsyncSession, tenant_id: str) -> list[Instance]:
    rows = (await s.execute(select(instances).where(instances.c.tenant_id == tenant_id))).mappings().all()
    return [_row(Instance, r) for r in rows]


async def cluster_ids_in_use(s: AsyncSession) -> set[str]:
    """The clusters live instances run on (a system scan: keys only; '' left out)."""
    q = select(instances.c.cluster_id).where(instances.c.cluster_id != "").distinct()
    return set((await s.execute(q)).scalars().all())


async def count_by_provider(s: AsyncSession) -> dict[tuple[str, str], int]:
    """Live instances by (provider, cluster id); '' is the cluster of instances made before the
    clusters registry (the configured engine's)."""
    q = (
        select(instances.c.provider_name, instances.c.cluster_id, func.count())
        .where(instances.c.state != "destroyed")
        .group_by(instances.c.provider_name, instances.c.cluster_id)
    )
    return {(name, cluster): int(n) for name, cluster, n in (await s.execute(q)).all()}


# -- releases ---------------------------------------------------------------------------------


async def next_release_version(s: AsyncSession, scope: Scope, instance_id: str) -> int:
    q = select(func.max(releases.c.version)).where(releases.c.instance_id == instance_id)
    v = await s.scalar(_scoped(q, scope.child_filter(releases)))
    return int(v or 0) + 1


async def insert_release(s: AsyncSession, values: Values) -> Release:
    return _row(
        Release, (await s.execute(insert(releases).values(**values).returning(releases))).mappings().one()
    )


async def get_release(s: AsyncSession, scope: Scope, release_id: str) -> Release | None:
    q = _scoped(select(releases).where(releases.c.id == release_id), scope.child_filter(releases))
    return _maybe(Release, (await s.execute(q)).mappings().first())


async def list_releases(
    s: AsyncSession, scope: Scope, instance_id: str, after: str | None, limit: int
) -> tuple[list[Release], int]:
    q = _scoped(select(releases).where(releases.c.instance_id == instance_id), scope.child_filter(releases))
    total = await s.scalar(select(func.count()).select_from(q.subquery())) or 0
    if after:
        q = q.where(releases.c.id < after)
    rows = (await s.execute(q.order_by(releases.c.id.desc()).limit(limit + 1))).mappings().all()
    return [_row(Release, r) for r in rows], int(total)


async def activate_release(s: AsyncSession, scope: Scope, instance_id: str, release_id: str) -> None:
    f = scope.child_filter(releases)
    q = update(releases).where(releases.c.instance_id == instance_id, releases.c.active)
    await s.execute(_scoped(q, f).values(active=False))
    await s.execute(_scoped(update(releases).where(releases.c.id == release_id), f).values(active=True))


# -- deployments ------------------------------------------------------------------------------


async def insert_deployment(s: AsyncSession, values: Values) -> Deployment:
    stmt = insert(deployments).values(**values).returning(deployments)
    return _row(Deployment, (await s.execute(stmt)).mappings().one())


async def get_deployment(
    s: AsyncSession, scope: Scope, deployment_id: str, *, lock: bool = False
) -> Deployment | None:
    q = _scoped(select(deployments).where(deployments.c.id == deployment_id), scope.child_filter(deployments))
    if lock:
        q = q.with_for_update()
    return _maybe(Deployment, (await s.execute(q)).mappings().first())


async def list_deployments(
    s: AsyncSession, scope: Scope, instance_id: str, after: str | None, limit: int
) -> tuple[list[Deployment], int]:
    q = _scoped(
        select(deployments).where(deployments.c.instance_id == instance_id), scope.child_filter(deployments)
    )
    total = await s.scalar(select(func.count()).select_from(q.subquery())) or 0
    if after:
        q = q.where(deployments.c.id < after)
    rows = (await s.execute(q.order_by(deployments.c.id.desc()).limit(limit + 1))).mappings().all()
    return [_row(Deployment, r) for r in rows], int(total)


async def in_flight_deployment(s: AsyncSession, scope: Scope, instance_id: str) -> Deployment | None:
    q = select(deployments).where(
        deployments.c.instance_id == instance_id, deployments.c.state.in_(("pending", "running"))
    )
    return _maybe(
        Deployment, (await s.execute(_scoped(q, scope.child_filter(deployments)))).mappings().first()
    )


async def update_deployment(s: AsyncSession, scope: Scope, deployment_id: str, values: Values) -> None:
    q = _scoped(update(deployments).where(deployments.c.id == deployment_id), scope.child_filter(deployments))
    await s.execute(q.values(updated_at=now(), **values))


async def last_succeeded_for_release(
    s: AsyncSession, scope: Scope, instance_id: str, release_id: str
) -> Deployment | None:
    q = (
        select(deployments)
        .where(
            deployments.c.instance_id == instance_id,
            deployments.c.release_id == release_id,
            deployments.c.state == "succeeded",
        )
        .order_by(deployments.c.id.desc())
        .limit(1)
    )
    return _maybe(
        Deployment, (await s.execute(_scoped(q, scope.child_filter(deployments)))).mappings().first()
    )


async def count_recent_deployments(s: AsyncSession, scope: Scope, instance_id: str, since: datetime) -> int:
    q = (
        select(func.count())
        .select_from(deployments)
        .where(deployments.c.instance_id == instance_id, deployments.c.created_at >= since)
    )
    return int(await s.scalar(_scoped(q, scope.child_filter(deployments))) or 0)


# -- health -----------------------------------------------------------------------------------


async def insert_check(s: AsyncSession, values: Values) -> HealthCheck:
    stmt = insert(health_checks).values(**values).returning(health_checks)
    return _row(HealthCheck, (await s.execute(stmt)).mappings().one())


async def get_check(s: AsyncSession, scope: Scope, check_id: str) -> HealthCheck | None:
    q = _scoped(
        select(health_checks).where(health_checks.c.id == check_id), scope.child_filter(health_checks)
    )
    return _maybe(HealthCheck, (await s.execute(q)).mappings().first())


async def list_checks(s: AsyncSession, scope: Scope, instance_id: str) -> list[HealthCheck]:
    q = _scoped(
        select(health_checks).where(health_checks.c.instance_id == instance_id),
        scope.child_filter(health_checks),
    )
    rows = (await s.execute(q.order_by(health_checks.c.id))).mappings().all()
    return [_row(HealthCheck, r) for r in rows]


async def enabled_checks(s: AsyncSession) -> list[HealthCheck]:
    q = (
        select(health_checks)
        .join(instances, instances.c.id == health_checks.c.instance_id)
        .where(health_checks.c.enabled, instances.c.state == "running")
    )
    return [_row(HealthCheck, r) for r in (await s.execute(q)).mappings().all()]


async def delete_check(s: AsyncSession, scope: Scope, check_id: str) -> None:
    q = delete(health_results).where(health_results.c.check_id == check_id)
    await s.execute(_scoped(q, scope.child_filter(health_results)))
    q = delete(health_checks).where(health_checks.c.id == check_id)
    await s.execute(_scoped(q, scope.child_filter(health_checks)))


async def update_check(s: AsyncSession, scope: Scope, check_id: str, values: Values) -> None:
    q = _scoped(
        update(health_checks).where(health_checks.c.id == check_id), scope.child_filter(health_checks)
    )
    await s.execute(q.values(updated_at=now(), **values))


async def insert_result(s: AsyncSession, result: HealthResult) -> None:
    await s.execute(insert(health_results).values(**asdict(result)))


async def latest_results(s: AsyncSession, scope: Scope, check_ids: list[str]) -> dict[str, HealthResult]:
    if not check_ids:
        return {}
    q = (
        select(health_results)
        .where(health_results.c.check_id.in_(check_ids))
        .distinct(health_results.c.check_id)
        .order_by(health_results.c.check_id, health_results.c.checked_at.desc())
    )
    q = _scoped(q, scope.child_filter(health_results))
    return {r["check_id"]: _row(HealthResult, r) for r in (await s.execute(q)).mappings().all()}


async def recent_results(
    s: AsyncSession, scope: Scope, instance_id: str, since: datetime
) -> list[ResultStatus]:
    q = (
        select(health_results.c.status, health_results.c.checked_at)
        .where(health_results.c.instance_id == instance_id, health_results.c.checked_at >= since)
        .order_by(health_results.c.checked_at.desc())
    )
    rows = (await s.execute(_scoped(q, scope.child_filter(health_results)))).mappings().all()
    return [_row(ResultStatus, r) for r in rows]


async def prune_results(s: AsyncSession, keep: timedelta) -> None:
    await s.execute(delete(health_results).where(health_results.c.checked_at < now() - keep))


async def swap_instance_health(s: AsyncSession, instance_id: str, tenant_id: str, status: str) -> str:
    """Store the aggregate; returns the previous one ("unknown" the first time)."""
    prev = await s.scalar(
        select(instance_health.c.status).where(instance_health.c.instance_id == instance_id).with_for_update()
    )
    stmt = pg_insert(instance_health).values(
        instance_id=instance_id, tenant_id=tenant_id, status=status, updated_at=now()
    )
    await s.execute(
        stmt.on_conflict_do_update(
            index_elements=["instance_id"], set_={"status": status, "updated_at": now()}
        )
    )
    return str(prev or "unknown")


# -- providers and cursors --------------------------------------------------------------------


async def upsert_provider(s: AsyncSession, values: Values) -> None:
    stmt = pg_insert(providers).values(**values)
    await s.execute(
        stmt.on_conflict_do_update(
            index_elements=["name"], set_={k: v for k, v in values.items() if k != "name"}
        )
    )


async def get_cursor(s: AsyncSession, name: str) -> int | None:
    v = await s.scalar(select(cursors.c.value).where(cursors.c.name == name))
    return None if v is None else int(v)


async def set_cursor(s: AsyncSession, name: str, value: int) -> None:
    stmt = pg_insert(cursors).values(name=name, value=value)
    await s.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": value}))
