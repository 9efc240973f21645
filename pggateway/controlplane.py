"""What the gateway needs from the control plane, and its gRPC implementation.

The interface is five calls: look up a tenant's PostgreSQL credentials (accounts); acquire,
renew (with the drain report of a handoff) and release a lease on a database; and follow the
control events the databases service pushes (freeze, unfreeze, writer switched, stopped). `GrpcControlPlane` speaks to the real
services with a signed system principal; tests pass any object with the same five methods that
raises `ControlPlaneError` the same way, so everything above this module is exercised for real.

Failures keep their gRPC status code and `ErrorInfo` reason; turning them into PostgreSQL errors
happens once, in `pggateway.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import grpc
from ctrlmesh.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from ctrlmesh.databases.v1 import databases_pb2, databases_pb2_grpc
from google.protobuf.duration_pb2 import Duration

from libs.clients import Channels, Signer
from libs.peers import decode

log = logging.getLogger("ctrlmesh.pggateway.controlplane")

# Lease states (databases.v1.Database.state) the gateway acts on.
STATE_READY = "ready"
WAITING_STATES = frozenset({"booting", "stopped", "stopping", "creating"})


@dataclass(frozen=True)
class Credentials:
    """A tenant's PostgreSQL identity (accounts.v1.PgCredentials)."""

    tenant_id: str
    tenant: str
    pg_user: str
    # PostgreSQL's `SCRAM-SHA-256$iter:salt$stored:server` form.
    scram_verifier: str
    # "active", "suspended" or "deleting".
    status: str
    # Plaintext, for the gateway's own login to the compute as the tenant role.
    pg_password: str


@dataclass(frozen=True)
class LeaseInfo:
    """The gateway's hold on a database (databases.v1.Lease), with where to route."""

    lease_id: str
    db_id: str
    epoch: int
    state: str
    writer_host: str
    writer_port: int
    freeze_new_checkouts: bool
    # The database name inside the compute; the DSN's name unless the control plane says otherwise.
    writer_database: str = ""

    @property
    def ready(self) -> bool:
        return self.state == STATE_READY and bool(self.writer_host) and self.writer_port > 0


@dataclass(frozen=True)
class LeaseReport:
    """What a renewal tells the control plane beyond the connection count (RenewLeaseRequest):
    the drain state during a handoff and the checkouts that had to queue (a counter)."""

    frozen: bool = False
    busy_backends: int = 0
    pinned_sessions: int = 0
    checkout_waits: int = 0


@dataclass(frozen=True)
class ControlMessage:
    """One pushed control event (databases.v1.ControlEvent); `kind` is the enum's name."""

    kind: str
    db_id: str = ""
    tenant_id: str = ""
    name: str = ""
    epoch: int = 0
    writer_host: str = ""
    writer_port: int = 0


class ControlPlaneError(Exception):
    """A control-plane call failed; `code` and `reason` are what the service answered."""

    def __init__(self, code: grpc.StatusCode, reason: str | None, message: str) -> None:
        super().__init__(f"{code.name} {reason or '-'}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


class ControlPlane(Protocol):
    """The gateway's view of the control plane."""

    async def lookup_credentials(self, pg_user: str) -> Credentials: ...

    async def acquire_lease(
        self, tenant_id: str, database: str, holder_id: str, ttl: float, wait: float
    ) -> LeaseInfo:
        """Acquire or join this holder's lease; starts a stopped database. `wait` is how long the
        call may block until the database is ready (0: answer at once)."""
        ...

    async def renew_lease(
        self,
        lease_id: str,
        epoch: int,
        ttl: float,
        active_connections: int,
        report: LeaseReport | None = None,
    ) -> LeaseInfo:
        """Extend the lease. FAILED_PRECONDITION when the epoch is stale (re-acquire)."""
        ...

    async def release_lease(self, lease_id: str, epoch: int) -> None: ...

    def watch_control(self, holder_id: str) -> AsyncIterator[ControlMessage]:
        """The pushed control events (HELLO first); ends or raises ControlPlaneError when the
        stream breaks (the caller reconnects)."""
        ...


def error_from_rpc(err: grpc.aio.AioRpcError) -> ControlPlaneError:
    """Keep the status code and the ErrorInfo reason of a failed call (pggateway/errors.py maps
    them to SQLSTATEs)."""
    f = decode(err)
    return ControlPlaneError(f.code, f.reason, f.message)


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def lease_from_proto(lease: databases_pb2.Lease) -> LeaseInfo:
    return LeaseInfo(
        lease_id=lease.lease_id,
        db_id=lease.db_id,
        epoch=lease.epoch,
        state=lease.state,
        writer_host=lease.writer_host,
        writer_port=lease.writer_port,
        freeze_new_checkouts=lease.freeze_new_checkouts,
        writer_database=str(getattr(lease, "writer_database", "") or ""),
    )


_ACQUIRE_HAS_WAIT = "wait" in databases_pb2.AcquireLeaseRequest.DESCRIPTOR.fields_by_name


class GrpcControlPlane:
    """The real control plane: accounts.TenantService and databases.LeaseService over gRPC."""

    def __init__(self, channels: Channels, signer: Signer, rpc_timeout: float = 5.0) -> None:
        self._tenants = accounts_pb2_grpc.TenantServiceStub(channels.get("accounts"))
        self._leases = databases_pb2_grpc.LeaseServiceStub(channels.get("databases"))
        self._autoscaler = databases_pb2_grpc.AutoscalerServiceStub(channels.get("databases"))
        self._signer = signer
        self._timeout = rpc_timeout

    async def lookup_credentials(self, pg_user: str) -> Credentials:
        try:
            c = await self._tenants.LookupPgCredentials(
                accounts_pb2.LookupPgCredentialsRequest(pg_user=pg_user),
                metadata=self._signer.system(),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        return Credentials(c.tenant_id, c.tenant, c.pg_user, c.scram_verifier, c.status, c.pg_password)

    async def acquire_lease(
        self, tenant_id: str, database: str, holder_id: str, ttl: float, wait: float
    ) -> LeaseInfo:
        req = databases_pb2.AcquireLeaseRequest(
            tenant_id=tenant_id, database=database, holder_id=holder_id, ttl=_duration(ttl)
        )
        blocking = wait > 0 and _ACQUIRE_HAS_WAIT
        if blocking:
            req.wait = True
        try:
            lease = await self._leases.AcquireLease(
                req,
                metadata=self._signer.system(),
                timeout=max(wait, self._timeout) if blocking else self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        return lease_from_proto(lease)

    async def renew_lease(
        self,
        lease_id: str,
        epoch: int,
        ttl: float,
        active_connections: int,
        report: LeaseReport | None = None,
    ) -> LeaseInfo:
        req = databases_pb2.RenewLeaseRequest(
            lease_id=lease_id, epoch=epoch, ttl=_duration(ttl), active_connections=active_connections
        )
        if report is not None:
            req.frozen = report.frozen
            req.busy_backends = report.busy_backends
            req.pinned_sessions = report.pinned_sessions
            req.checkout_waits = report.checkout_waits
        try:
            lease = await self._leases.RenewLease(
                req,
                metadata=self._signer.system(),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        return lease_from_proto(lease)

    async def release_lease(self, lease_id: str, epoch: int) -> None:
        try:
            await self._leases.ReleaseLease(
                databases_pb2.ReleaseLeaseRequest(lease_id=lease_id, epoch=epoch),
                metadata=self._signer.system(),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None

    async def watch_control(self, holder_id: str) -> AsyncIterator[ControlMessage]:
        call = self._autoscaler.WatchControl(
            databases_pb2.WatchControlRequest(holder_id=holder_id), metadata=self._signer.system()
        )
        try:
            async for ev in call:
                yield ControlMessage(
                    kind=databases_pb2.ControlEvent.Kind.Name(ev.kind),
                    db_id=ev.db_id,
                    tenant_id=ev.tenant_id,
                    name=ev.name,
                    epoch=ev.epoch,
                    writer_host=ev.writer_host,
                    writer_port=ev.writer_port,
                )
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()


class CredentialCache:
    """Credentials reused for a few seconds (so a burst of connections costs one lookup, while a
    rotated password applies almost at once). Unknown users are remembered as briefly, so a
    password-guessing loop cannot hammer accounts; concurrent lookups of one user share a call."""

    def __init__(self, control_plane: ControlPlane, ttl: float) -> None:
        self._cp = control_plane
        self._ttl = ttl
        self._entries: dict[str, tuple[float, Credentials | ControlPlaneError]] = {}
        self._inflight: dict[str, asyncio.Task[Credentials]] = {}

    async def get(self, pg_user: str) -> Credentials:
        hit = self._entries.get(pg_user)
        if hit is not None and hit[0] > time.monotonic():
            value = hit[1]
            if isinstance(value, ControlPlaneError):
                raise value
            return value
        task = self._inflight.get(pg_user)
        if task is None:
            # A task, so a client that disconnects mid-lookup does not cancel it for the others.
            task = asyncio.ensure_future(self._lookup(pg_user))
            self._inflight[pg_user] = task
            task.add_done_callback(
                lambda t: (self._inflight.pop(pg_user, None), t.cancelled() or t.exception())
            )
        return await asyncio.shield(task)

    async def _lookup(self, pg_user: str) -> Credentials:
        try:
            creds = await self._cp.lookup_credentials(pg_user)
        except ControlPlaneError as err:
            if err.code == grpc.StatusCode.NOT_FOUND:
                self._remember(pg_user, err)
            raise
        self._remember(pg_user, creds)
        return creds

    def _remember(self, pg_user: str, value: Credentials | ControlPlaneError) -> None:
        if len(self._entries) > 10000:  # bounded: user names come from unauthenticated clients
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
        self._entries[pg_user] = (time.monotonic() + self._ttl, value)

    def invalidate(self, pg_user: str) -> None:
        self._entries.pop(pg_user, None)
