"""SQL for routes and the ingress's copy of instances (SQLAlchemy Core, one AsyncSession per
unit of work).

Every read of a route takes the caller's `Scope` (one tenant, one account's tenants, or all), so
another tenant's route is simply not found. The renderer's scans read every row: they serve the
platform's one ingress, never a caller.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from libs.principal import Principal, is_global
from services.network.models import ingress_instances, routes


@dataclass(frozen=True)
class Scope:
    """The tenants a caller may see (as in the instances service)."""

    tenant_id: str | None = None
    account_id: str | None = None

    @classmethod
    def of(cls, p: Principal) -> Scope:
        if is_global(p):
            return cls()
        if p.scope == "account":
            return cls(account_id=p.account_id)
        return cls(tenant_id=p.tenant_id or "\x00")  # a tenant key without a tenant sees nothing

    def route_filter(self) -> ColumnElement[bool] | None:
        if self.tenant_id is not None:
            return routes.c.tenant_id == self.tenant_id
        if self.account_id is not None:
            return routes.c.account_id == self.account_id
        return None


@dataclass(frozen=True)
class RouteRow:
    id: str
    tenant_id: str
    account_id: str
    instance_id: str
    service_name: str
    path: str
    port: int
    protocol: str
    weight: int
    strip_prefix: bool
    hostname: str
    created_at: datetime
    updated_at: datetime


_ROUTE_FIELDS = tuple(f.name for f in fields(RouteRow))


def _route(row: Any) -> RouteRow | None:
    return None if row is None else RouteRow(**{k: row[k] for k in _ROUTE_FIELDS})


@dataclass(frozen=True)
class InstanceRow:
    """What the ingress knows of one instance (see models.ingress_instances)."""

    instance_id: str
    tenant_id: str
    account_id: str
    tenant_slug: str
    slug: str
    state: str
    main_service: str
    ports: list[dict[str, Any]]
    upstreams: list[dict[str, Any]]
    updated_at: datetime


_INSTANCE_FIELDS = tuple(f.name for f in fields(InstanceRow))


def _instance(row: Any) -> InstanceRow | None:
    return None if row is None else InstanceRow(**{k: row[k] for k in _INSTANCE_FIELDS})


# -- routes --------------------------------------------------------------------------------------


async def insert_route(s: AsyncSession, values: dict[str, Any]) -> RouteRow:
    row = (await s.execute(routes.insert().values(**values).returning(routes))).mappings().first()
    out = _route(row)
    assert out is not None
    return out


async def get_route(s: AsyncSession, scope: Scope, route_id: str, *, lock: bool = False) -> RouteRow | None:
    q = select(routes).where(routes.c.id == route_id)
    cond = scope.route_filter()
    if cond is not None:
        q = q.where(cond)
    if lock:
        q = q.with_for_update()
    return _route((await s.execute(q)).mappings().first())


async def list_routes(s: AsyncSession, tenant_id: str, instance_id: str) -> list[RouteRow]:
    q = (
        select(routes)
        .where(routes.c.tenant_id == tenant_id, routes.c.instance_id == instance_id)
        .order_by(routes.c.id)
    )
    return [r for r in map(_route, (await s.execute(q)).mappings().all()) if r is not None]


async def update_route(s: AsyncSession, route_id: str, values: dict[str, Any]) -> RouteRow | None:
    q = update(routes).where(routes.c.id == route_id).values(**values).returning(routes)
    return _route((await s.execute(q)).mappings().first())


async def delete_route(s: AsyncSession, route_id: str) -> None:
    await s.execute(delete(routes).where(routes.c.id == route_id))


async def delete_instance_routes(s: AsyncSession, instance_id: str) -> list[RouteRow]:
    q = delete(routes).where(routes.c.instance_id == instance_id).returning(routes)
    return [r for r in map(_route, (await s.execute(q)).mappings().all()) if r is not None]


async def all_routes(s: AsyncSession) -> list[RouteRow]:
    q = select(routes).order_by(routes.c.id)
    return [r for r in map(_route, (await s.execute(q)).mappings().all()) if r is not None]


# -- the ingress's instances ---------------------------------------------------------------------


async def get_instance(s: AsyncSession, instance_id: str) -> InstanceRow | None:
    q = select(ingress_instances).where(ingress_instances.c.instance_id == instance_id)
    return _instance((await s.execute(q)).mappings().first())


async def upsert_instance(s: AsyncSession, values: dict[str, Any]) -> None:
    stmt = pg_insert(ingress_instances).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[ingress_instances.c.instance_id],
        set_={k: stmt.excluded[k] for k in values if k != "instance_id"},
    )
    await s.execute(stmt)


async def delete_instance(s: AsyncSession, instance_id: str) -> None:
    await s.execute(delete(ingress_instances).where(ingress_instances.c.instance_id == instance_id))


async def all_instances(s: AsyncSession) -> list[InstanceRow]:
    q = select(ingress_instances).order_by(ingress_instances.c.instance_id)
    return [r for r in map(_instance, (await s.execute(q)).mappings().all()) if r is not None]


async def instance_ids(s: AsyncSession) -> list[str]:
    return list((await s.scalars(select(ingress_instances.c.instance_id))).all())
