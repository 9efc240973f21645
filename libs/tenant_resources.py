"""The shared internal TenantResourcesService, implemented from a declarative spec.

Each resource-owning service says which of its tables hold tenant rows and what to count;
accounts then counts (quota usage, db_count), purges (cascade delete) and summarises (stats)
without ever reading another service's tables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import grpc
from ctrlmesh.common.v1 import internal_pb2, internal_pb2_grpc
from sqlalchemy import ColumnElement, Table, delete, func, select

from libs import principal as principals
from libs.db import Database
from libs.errors import PermissionDenied


@dataclass
class Count:
    """`key` = aggregate over `table` rows of one tenant (optionally filtered)."""

    key: str
    table: Table
    aggregate: Callable[[Table], ColumnElement[int]] = lambda t: func.count()
    where: Callable[[Table], ColumnElement[bool]] | None = None


@dataclass
class Spec:
    counts: list[Count]
    # Tables whose rows of a tenant are deleted on purge, children first.
    purge: list[Table]
    stats: list[Count] = field(default_factory=list)
    # Extra purge work (stopping computes, removing containers); returns True when finished.
    before_purge: Callable[[str], Awaitable[bool]] | None = None


class TenantResources(internal_pb2_grpc.TenantResourcesServiceServicer):
    def __init__(self, db: Database, spec: Spec):
        self._db = db
        self._spec = spec

    @staticmethod
    def _internal_only() -> None:
        if not principals.is_system(principals.current()):
            raise PermissionDenied("internal RPC")

    async def CountTenantResources(
        self, request: internal_pb2.CountTenantResourcesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> internal_pb2.CountTenantResourcesResponse:
        self._internal_only()
        out = internal_pb2.CountTenantResourcesResponse()
        ids = list(request.tenant_ids)
        async with self._db.session() as s:
            for c in self._spec.counts:
                t = c.table
                q = (
                    select(t.c.tenant_id, c.aggregate(t))
                    .where(t.c.tenant_id.in_(ids))
                    .group_by(t.c.tenant_id)
                )
                if c.where is not None:
                    q = q.where(c.where(t))
                for tenant_id, value in (await s.execute(q)).all():
                    out.tenants[tenant_id].counts[c.key] = int(value or 0)
        return out

    async def PurgeTenant(
        self, request: internal_pb2.PurgeTenantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> internal_pb2.PurgeTenantResponse:
        self._internal_only()
        if self._spec.before_purge is not None and not await self._spec.before_purge(request.tenant_id):
            return internal_pb2.PurgeTenantResponse(done=False)
        async with self._db.session() as s:
            for t in self._spec.purge:
                await s.execute(delete(t).where(t.c.tenant_id == request.tenant_id))
        return internal_pb2.PurgeTenantResponse(done=True)

    async def GetResourceStats(
        self, request: internal_pb2.GetResourceStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> internal_pb2.GetResourceStatsResponse:
        self._internal_only()
        out = internal_pb2.GetResourceStatsResponse()
        async with self._db.session() as s:
            for c in self._spec.stats:
                q = select(c.aggregate(c.table)).select_from(c.table)
                if c.where is not None:
                    q = q.where(c.where(c.table))
                out.counts[c.key] = int((await s.scalar(q)) or 0)
        return out


def register_unimplemented(
    server: grpc.aio.Server, pb2: ModuleType, pb2_grpc: ModuleType, *, served: Collection[str] = ()
) -> list[str]:
    """Serve a contract whose logic is not written yet: every method answers UNIMPLEMENTED,
    which the edge reports as 501 NotImplemented. Internal-only services are included; the
    services named in `served` (short names) are left to their real servicers."""
    names = []
    for svc in pb2.DESCRIPTOR.services_by_name.values():
        if svc.name in served:
            continue
        base = getattr(pb2_grpc, f"{svc.name}Servicer")
        getattr(pb2_grpc, f"add_{svc.name}Servicer_to_server")(base(), server)
        names.append(svc.full_name)
    return names


def register_resources(server: grpc.aio.Server, db: Database, spec: Spec) -> list[str]:
    internal_pb2_grpc.add_TenantResourcesServiceServicer_to_server(TenantResources(db, spec), server)
    return [internal_pb2.DESCRIPTOR.services_by_name["TenantResourcesService"].full_name]
