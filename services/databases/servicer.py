"""Transport for databases: proto ⇄ domain, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
from ctrlmesh.databases.v1 import databases_pb2 as pb
from ctrlmesh.databases.v1 import databases_pb2_grpc as rpc
from google.protobuf import duration_pb2, empty_pb2

from libs import principal as principals
from libs.errors import PermissionDenied
from libs.principal import is_system
from libs.protoconv import ts
from services.databases import control
from services.databases import repository as repo
from services.databases.autoscaler import HandoffDomain
from services.databases.compute.cgroups import Limits
from services.databases.domain import DatabasesDomain, LeaseDomain, deadline_after
from services.databases.repository import Db, LeaseRow
from services.databases.state import State


def duration(value: duration_pb2.Duration, present: bool) -> timedelta | None:
    return value.ToTimedelta() if present else None


def database(d: Db, tenant: str = "", limits: Limits | None = None) -> pb.Database:
    msg = pb.Database(
        db_id=d.id,
        name=d.name,
        tenant=tenant,
        tenant_id=d.tenant_id,
        size=d.size,
        state=d.state,
        timeline=d.timeline,
        worker_id=d.worker_id,
        active_connections=d.active_connections,
        last_used_at=ts(d.last_used_at),
        current_scale=d.current_scale,
        target_scale=d.target_scale,
        current_profile=d.current_profile,
        target_profile=d.target_profile,
        scale_state=d.scale_state,
        freeze_new_checkouts=d.freeze_new_checkouts,
        lease_control_epoch=d.lease_control_epoch,
        autoscale_cooldown_until=ts(d.autoscale_cooldown_until),
        scale_phase_started_at=ts(d.scale_phase_started_at),
        scale_phase_deadline_at=ts(d.scale_phase_deadline_at),
        created_at=ts(d.created_at),
        updated_at=ts(d.updated_at),
    )
    if limits is not None:
        msg.resource_limits_enforced = limits.enforced
        msg.resource_limits = limits.mode if limits.enforced else f"none: {limits.detail}"
    for f in ("candidate_profile", "candidate_worker_id", "candidate_writer_term", "scale_failure_reason"):
        value = getattr(d, f)
        if value is not None:
            setattr(msg, f, value)
    return msg


def writer(d: Db) -> tuple[str, int]:
    """The address to route to, only while the writer is `ready`."""
    return (d.writer_host, d.writer_port) if d.state == State.READY else ("", 0)


def lease(row: LeaseRow, d: Db) -> pb.Lease:
    host, port = writer(d)
    return pb.Lease(
        lease_id=row.id,
        db_id=row.db_id,
        epoch=row.epoch,
        expires_at=ts(row.expires_at),
        writer_host=host,
        writer_port=port,
        state=d.state,
        freeze_new_checkouts=d.freeze_new_checkouts,
    )


class DatabaseService(rpc.DatabaseServiceServicer):
    def __init__(self, domain: DatabasesDomain):
        self.d = domain

    def _db(self, row: Db, tenant: str = "") -> pb.Database:
        return database(row, tenant, self.d.lifecycle.driver.limits())

    async def CreateDatabase(
        self, request: pb.CreateDatabaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Database:
        row, t = await self.d.create(
            principals.current(),
            request.tenant,
            request.name,
            request.size,
            start_immediately=request.start_immediately,
            initial_scale=request.initial_scale,
        )
        return self._db(row, t.name)

    async def ListDatabases(
        self, request: pb.ListDatabasesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListDatabasesResponse:
        rows, total, t = await self.d.list(
            principals.current(),
            request.tenant,
            state=request.state,
            name_prefix=request.name_prefix,
            limit=request.limit,
            offset=request.offset,
        )
        return pb.ListDatabasesResponse(items=[self._db(r, t.name) for r in rows], total=total)

    async def GetDatabase(
        self, request: pb.GetDatabaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Database:
        row, t = await self.d.get(principals.current(), request.tenant, request.db)
        return self._db(row, t.name)

    async def GetDatabaseById(
        self, request: pb.GetDatabaseByIdRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Database:
        row, t = await self.d.get_by_id(principals.current(), request.db_id)
        return self._db(row, t.name)

    async def DeleteDatabase(
        self, request: pb.DeleteDatabaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Database:
        row, t = await self.d.delete(principals.current(), request.tenant, request.db, force=request.force)
        return self._db(row, t.name)

    async def StartDatabase(
        self, request: pb.StartDatabaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        self.d.manual_lifecycle("start")
        return empty_pb2.Empty()

    async def StopDatabase(
        self, request: pb.StopDatabaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        self.d.manual_lifecycle("stop")
        return empty_pb2.Empty()

    async def ScaleDatabase(
        self, request: pb.ScaleDatabaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        self.d.manual_lifecycle("scale")
        return empty_pb2.Empty()

    async def ResolveDatabase(
        self, request: pb.ResolveDatabaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ResolveDatabaseResponse:
        row = await self.d.resolve(principals.current(), request.tenant_id, request.name)
        host, port = writer(row)
        return pb.ResolveDatabaseResponse(database=self._db(row), writer_host=host, writer_port=port)


class LeaseService(rpc.LeaseServiceServicer):
    def __init__(self, domain: LeaseDomain):
        self.d = domain

    async def AcquireLease(
        self, request: pb.AcquireLeaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Lease:
        row, db = await self.d.acquire(
            principals.current(),
            request.tenant_id,
            request.database,
            request.holder_id,
            duration(request.ttl, request.HasField("ttl")),
            wait_until=deadline_after(context.time_remaining()) if request.wait else None,
        )
        return lease(row, db)

    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Lease:
        row, db = await self.d.renew(
            principals.current(),
            request.lease_id,
            request.epoch,
            duration(request.ttl, request.HasField("ttl")),
            request.active_connections,
            repo.DrainReport(
                frozen=int(request.frozen),
                busy=request.busy_backends,
                pinned=request.pinned_sessions,
                waits=request.checkout_waits,
            ),
        )
        return lease(row, db)

    async def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.release(principals.current(), request.lease_id, request.epoch)
        return empty_pb2.Empty()


_KINDS = {
    control.HELLO: pb.ControlEvent.HELLO,
    control.FREEZE: pb.ControlEvent.FREEZE,
    control.UNFREEZE: pb.ControlEvent.UNFREEZE,
    control.WRITER_SWITCHED: pb.ControlEvent.WRITER_SWITCHED,
    control.STOPPED: pb.ControlEvent.STOPPED,
}


class AutoscalerService(rpc.AutoscalerServiceServicer):
    def __init__(self, handoffs: HandoffDomain, bus: control.ControlBus):
        self.h = handoffs
        self.bus = bus

    async def RequestHandoff(
        self, request: pb.RequestHandoffRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Database:
        row = await self.h.request(
            principals.current(), request.db_id, request.target_profile, request.reason or "operator"
        )
        return database(row, "", self.h.lifecycle.driver.limits())

    async def WatchControl(
        self, request: pb.WatchControlRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ControlEvent]:
        p = principals.current()
        if not is_system(p):
            raise PermissionDenied("internal RPC")
        async for ev in self.bus.subscribe():
            msg = pb.ControlEvent(
                kind=_KINDS[ev.kind],
                db_id=ev.db_id,
                tenant_id=ev.tenant_id,
                name=ev.name,
                epoch=ev.epoch,
                writer_host=ev.writer_host,
                writer_port=ev.writer_port,
            )
            msg.sent_at.GetCurrentTime()
            yield msg


def register(
    server: grpc.aio.Server,
    databases: DatabasesDomain,
    leases: LeaseDomain,
    handoffs: HandoffDomain,
    bus: control.ControlBus,
) -> list[str]:
    rpc.add_DatabaseServiceServicer_to_server(DatabaseService(databases), server)
    rpc.add_LeaseServiceServicer_to_server(LeaseService(leases), server)
    rpc.add_AutoscalerServiceServicer_to_server(AutoscalerService(handoffs, bus), server)
    return [s.full_name for s in pb.DESCRIPTOR.services_by_name.values()]
