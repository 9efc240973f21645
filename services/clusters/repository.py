"""SQL for the clusters service (SQLAlchemy Core over one AsyncSession per unit of work).

Clusters and nodes are platform resources (every key reads them; only global keys change them).
Managed databases are tenant data: every read of them takes the caller's visibility (`Scope`),
so another tenant's database is simply not found.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from libs import principal as principals
from libs.timeutil import now
from services.clusters.models import clusters, managed_databases, nodes


@dataclass(frozen=True)
class ClusterRow:
    id: str
    name: str
    type: str
    description: str | None
    config: dict[str, Any]
    endpoint: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class NodeRow:
    id: str
    cluster_id: str
    engine_id: str
    name: str
    address: str
    role: str
    availability: str
    engine_state: str
    status: str
    cpu: float
    memory_mb: int
    running_tasks: int
    labels: dict[str, str]
    last_heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ManagedRow:
    id: str
    tenant_id: str
    account_id: str
    cluster_id: str
    name: str
    pg_name: str
    engine: str
    version: str
    db_id: str
    app_id: str | None
    state: str
    created_at: datetime
    updated_at: datetime


def _mk(cls: Any, row: Any) -> Any:
    return None if row is None else cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Scope:
    """What a caller may see of tenant data: one tenant, one account's tenants, or everything."""

    tenant_id: str = ""
    account_id: str = ""

    @classmethod
    def of(cls, p: principals.Principal) -> Scope:
        if principals.is_global(p):
            return cls()
        if p.scope == "tenant":
            return cls(tenant_id=p.tenant_id or "-")
        return cls(account_id=p.account_id or "-")

    def where(self, t: Any) -> ColumnElement[bool] | None:
        if self.tenant_id:
            return t.c.tenant_id == self.tenant_id  # type: ignore[no-any-return]
        if self.account_id:
            return t.c.account_id == self.account_id  # type: ignore[no-any-return]
        return None


# -- clusters ------------------------------------------------------------------------------------


async def list_clusters(s: AsyncSession) -> list[ClusterRow]:
    rows = (await s.execute(select(clusters).order_by(clusters.c.created_at, clusters.c.name))).mappings()
    return [_mk(ClusterRow, r) for r in rows]


async def get_cluster(s: AsyncSession, cluster_id: str) -> ClusterRow | None:
    row = (await s.execute(select(clusters).where(clusters.c.id == cluster_id))).mappings().first()
    return _mk(ClusterRow, row)  # type: ignore[no-any-return]


async def cluster_by_name(s: AsyncSession, name: str) -> ClusterRow | None:
    row = (await s.execute(select(clusters).where(clusters.c.name == name))).mappings().first()
    return _mk(ClusterRow, row)  # type: ignore[no-any-return]


async def insert_cluster(s: AsyncSession, **values: Any) -> ClusterRow | None:
    """The new cluster, or None when its name is taken (the unique constraint decides)."""
    t = now()
    stmt = (
        pg_insert(clusters)
        .values(created_at=t, updated_at=t, **values)
        .on_conflict_do_nothing(index_elements=[clusters.c.name])
        .returning(*clusters.c)
    )
    return _mk(ClusterRow, (await s.execute(stmt)).mappings().first())  # type: ignore[no-any-return]


async def set_cluster_endpoint(s: AsyncSession, cluster_id: str, endpoint: str) -> None:
    await s.execute(
        update(clusters).where(clusters.c.id == cluster_id).values(endpoint=endpoint, updated_at=now())
    )


# -- nodes ---------------------------------------------------------------------------------------


async def list_nodes(s: AsyncSession, cluster_id: str = "", status: str = "") -> list[NodeRow]:
    q = select(nodes).order_by(nodes.c.cluster_id, nodes.c.name, nodes.c.id)
    if cluster_id:
        q = q.where(nodes.c.cluster_id == cluster_id)
    if status:
        q = q.where(nodes.c.status == status)
    return [_mk(NodeRow, r) for r in (await s.execute(q)).mappings()]


async def get_node(s: AsyncSession, node_id: str, *, lock: bool = False) -> NodeRow | None:
    q = select(nodes).where(nodes.c.id == node_id)
    if lock:
        q = q.with_for_update()
    return _mk(NodeRow, (await s.execute(q)).mappings().first())  # type: ignore[no-any-return]


async def insert_node(s: AsyncSession, **values: Any) -> NodeRow | None:
    """A node seen for the first time; None when another writer inserted it first."""
    t = now()
    stmt = (
        pg_insert(nodes)
        .values(created_at=t, updated_at=t, **values)
        .on_conflict_do_nothing()
        .returning(*nodes.c)
    )
    return _mk(NodeRow, (await s.execute(stmt)).mappings().first())  # type: ignore[no-any-return]


async def update_node(s: AsyncSession, node_id: str, **values: Any) -> None:
    await s.execute(update(nodes).where(nodes.c.id == node_id).values(updated_at=now(), **values))


async def count_nodes(s: AsyncSession) -> int:
    return int(await s.scalar(select(func.count()).select_from(nodes)) or 0)


# -- managed databases ---------------------------------------------------------------------------


def _scoped(q: Any, scope: Scope) -> Any:
    cond = scope.where(managed_databases)
    return q if cond is None else q.where(cond)


async def list_managed(s: AsyncSession, scope: Scope) -> list[ManagedRow]:
    q = _scoped(select(managed_databases), scope).order_by(managed_databases.c.created_at)
    return [_mk(ManagedRow, r) for r in (await s.execute(q)).mappings()]


async def get_managed(s: AsyncSession, scope: Scope, md_id: str, *, lock: bool = False) -> ManagedRow | None:
    q = _scoped(select(managed_databases).where(managed_databases.c.id == md_id), scope)
    if lock:
        q = q.with_for_update()
    return _mk(ManagedRow, (await s.execute(q)).mappings().first())  # type: ignore[no-any-return]


async def managed_bound_to(s: AsyncSession, app_id: str) -> ManagedRow | None:
    q = select(managed_databases).where(managed_databases.c.app_id == app_id)
    return _mk(ManagedRow, (await s.execute(q)).mappings().first())  # type: ignore[no-any-return]


async def insert_managed(s: AsyncSession, **values: Any) -> ManagedRow:
    t = now()
    stmt = (
        insert(managed_databases).values(created_at=t, updated_at=t, **values).returning(*managed_databases.c)
    )
    return _mk(ManagedRow, (await s.execute(stmt)).mappings().one())  # type: ignore[no-any-return]


async def update_managed(s: AsyncSession, md_id: str, **values: Any) -> None:
    await s.execute(
        update(managed_databases).where(managed_databases.c.id == md_id).values(updated_at=now(), **values)
    )


async def delete_managed(s: AsyncSession, md_id: str) -> None:
    await s.execute(delete(managed_databases).where(managed_databases.c.id == md_id))


async def managed_names_taken(s: AsyncSession, tenant_id: str, pg_name: str) -> bool:
    q = select(func.count()).where(
        managed_databases.c.tenant_id == tenant_id, managed_databases.c.pg_name == pg_name
    )
    return bool(await s.scalar(q))
