"""Internal gRPC clients: one base for calling another ctrlmesh service, and the one decoder of a
failed call's status.

Every client of another service (accounts' view of the owners, the databases and instances
services' view of accounts, the PG Gateway's control plane) derives from `Peer`: the channel of
the named service (traced: the OpenTelemetry client interceptor propagates the trace context),
a signed principal in the metadata (the caller's own, re-signed, or this process's system
principal), and a deadline on every call. A failed call is translated once, here:

- NOT_FOUND is the one not-found answer (`not_found(kind, ident)` when the caller names what it
  looked up, so another tenant's resource reads exactly like a missing one);
- a refusal that carries a catalogued `ErrorInfo` reason with its own code (PermissionDenied,
  InvalidState, LimitExceeded, ...) keeps its reason, message and details;
- anything else (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, a reason we do not know) is
  that service being unavailable: `Unavailable` naming it, never the peer's raw text.

`decode()` is what the edge's error mapping and the PG Gateway's SQLSTATE mapping read too.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from ctrlmesh.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from ctrlmesh.common.v1 import internal_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from libs import events
from libs.clients import Channels, Signer
from libs.errors import (
    REASONS,
    STATUS_DETAILS_KEY,
    CtrlmeshError,
    NotFound,
    Unavailable,
    from_reason,
    not_found,
)
from libs.events import STREAM_HEAD
from libs.principal import Principal, is_system
from libs.visibility import sees

log = logging.getLogger("ctrlmesh.peers")

# Reasons that say the peer itself failed: they never pass through as the peer's refusal.
_PEER_FAILURES = frozenset(("Internal", "Unavailable"))

Resp = TypeVar("Resp")
Row = TypeVar("Row")
TenantT = TypeVar("TenantT")


@dataclass(frozen=True)
class RpcFailure:
    """What a failed call said: its code, text and the structured details of its status."""

    code: grpc.StatusCode
    message: str
    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def decode(err: grpc.aio.AioRpcError) -> RpcFailure:
    """The status of a failed call, with the ErrorInfo reason and BadRequest fields it carries."""
    reason: str | None = None
    metadata: dict[str, str] = {}
    fields: dict[str, str] = {}
    for key, value in err.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            continue  # a peer that is not ours: its code and text still stand
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                metadata.update(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                detail.Unpack(br)
                fields.update({v.field: v.description for v in br.field_violations})
    return RpcFailure(err.code(), err.details() or "", reason, metadata, fields)


def to_ctrlmesh(err: grpc.aio.AioRpcError, service: str, *, kind: str = "", ident: str = "") -> CtrlmeshError:
    """A failed call to `service` as our own error (the translation described above)."""
    f = decode(err)
    if f.code == grpc.StatusCode.NOT_FOUND:
        if kind:
            return not_found(kind, ident)
        return NotFound(f.message or "not found", details=dict(f.metadata))
    reason = f.reason
    if (
        reason is not None
        and reason in REASONS
        and REASONS[reason].code == f.code
        and reason not in _PEER_FAILURES
    ):
        details: dict[str, Any] = dict(f.metadata)
        if f.fields:
            details["fields"] = f.fields
        return from_reason(reason, f.message or reason, details)
    return Unavailable(f"the {service} service is unavailable", details={"service": service})


class Peer:
    """Base of a client of one other service (`service`, a name from libs.settings.SERVICES:
    set by the subclass, or given when one client class serves several services)."""

    service: str

    def __init__(self, channels: Channels, signer: Signer, timeout: float = 5.0, *, service: str = ""):
        self._channels = channels
        self._signer = signer
        self.timeout = timeout
        if service:
            self.service = service

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channels.get(self.service)

    def metadata(self, caller: Principal | None = None) -> list[tuple[str, str | bytes]]:
        """The caller's principal re-signed (the peer applies its visibility), else ours."""
        return self._signer.metadata(caller)

    async def call(
        self,
        rpc: Callable[..., Awaitable[Resp]],
        request: Any,
        *,
        caller: Principal | None = None,
        deadline: float | None = None,
        kind: str = "",
        ident: str = "",
    ) -> Resp:
        """One unary call with principal and deadline (seconds; the default `timeout` unless
        given); a failure raised as a CtrlmeshError."""
        try:
            return await rpc(
                request,
                metadata=self.metadata(caller),
                timeout=self.timeout if deadline is None else deadline,
            )
        except grpc.aio.AioRpcError as err:
            raise to_ctrlmesh(err, self.service, kind=kind, ident=ident) from None


class TenantCache:
    """What accounts said about tenants, kept by a calling service so its hot path makes no call
    to accounts: the tenant (status, account, name) and its limits (plan, quota), each fetched
    with this service's system principal; whether the caller may see it is decided locally
    (libs/visibility.py, the rule accounts applies).

    Freshness: a follower reads accounts' event stream (every event names its tenant and
    account) and drops what an event touches: a suspension, deletion, plan, quota or credential
    change is seen here as soon as accounts publishes it. Entries are used only while the
    follower is connected (until its `stream.head` arrives, and after it drops, every lookup
    asks accounts), and never longer than `ttl` seconds after they were fetched, which bounds
    staleness if the stream stalls. A fetch that raced an invalidation is not kept. ttl 0: no
    caching.
    """

    # Entries of either kind beyond which the cache starts afresh (many tenants, few hot).
    MAX_ENTRIES = 10_000
    RETRY_AFTER = 1.0

    def __init__(
        self,
        events: Callable[[], AsyncIterator[internal_pb2.Event]],
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._events = events
        self.ttl = ttl
        self._clock = clock
        # By id and by name: both name the same record.
        self._tenants: dict[str, tuple[float, accounts_pb2.Tenant]] = {}
        self._limits: dict[str, tuple[float, accounts_pb2.TenantLimits]] = {}
        self._generation = 0
        self.live = False
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        if self._task is None and self.ttl > 0:
            # A context of its own: not the RPC that happened to start it (its principal, its
            # budget tally).
            self._task = asyncio.get_running_loop().create_task(
                self._follow(), name="tenant-cache", context=contextvars.Context()
            )

    async def tenant(
        self, ref: str, fetch: Callable[[], Awaitable[accounts_pb2.Tenant]], *, fresh: bool = False
    ) -> accounts_pb2.Tenant:
        """The cached tenant, else `fetch()`ed (and kept); `fresh`: fetched (and kept) anyway."""
        self._start()
        hit = None if fresh else self._tenants.get(ref)
        if hit is not None and self.live and hit[0] > self._clock():
            return hit[1]
        generation = self._generation
        t = await fetch()
        if self.live and generation == self._generation:
            if len(self._tenants) >= self.MAX_ENTRIES:
                self._tenants.clear()
            expires = self._clock() + self.ttl
            self._tenants[t.id] = self._tenants[t.name] = (expires, t)
        return t

    async def limits(
        self,
        tenant_id: str,
        fetch: Callable[[], Awaitable[accounts_pb2.TenantLimits]],
        *,
        fresh: bool = False,
    ) -> accounts_pb2.TenantLimits:
        self._start()
        hit = None if fresh else self._limits.get(tenant_id)
        if hit is not None and self.live and hit[0] > self._clock():
            return hit[1]
        generation = self._generation
        lim = await fetch()
        if self.live and generation == self._generation:
            if len(self._limits) >= self.MAX_ENTRIES:
                self._limits.clear()
            # Keyed as asked (an id or a name); invalidated by the tenant id the answer names.
            self._limits[tenant_id] = (self._clock() + self.ttl, lim)
        return lim

    def invalidate(self, tenant_id: str = "", account_id: str = "") -> None:
        """Forget a tenant (by id), every tenant of an account, or everything (neither given)."""
        self._generation += 1
        if tenant_id:
            self._tenants = {k: v for k, v in self._tenants.items() if v[1].id != tenant_id}
            self._limits = {k: v for k, v in self._limits.items() if v[1].tenant_id != tenant_id}
        elif account_id:
            self._tenants = {k: v for k, v in self._tenants.items() if v[1].account_id != account_id}
            self._limits.clear()  # the plan is the account's; limits do not name their account
        else:
            self._tenants.clear()
            self._limits.clear()

    async def _follow(self) -> None:
        while True:
            try:
                async for event in self._events():
                    if event.type == STREAM_HEAD:
                        # Anything fetched before this point may have missed an event.
                        self.invalidate()
                        self.live = True
                        continue
                    self.invalidate(event.tenant_id, event.account_id)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                code = err.code().name if isinstance(err, grpc.aio.AioRpcError) else type(err).__name__
                log.info("accounts' event stream is unavailable (%s): tenant lookups go to accounts", code)
            self.live = False
            self.invalidate()
            await asyncio.sleep(self.RETRY_AFTER)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.live = False


class AccountsPeer(Peer):
    """The accounts service as the other services ask it about a tenant: the tenant as the
    caller may see it (NOT_FOUND when it may not) and its status, plan and quota. Each service
    keeps from the answers the few fields it needs.

    Every answer is fetched with this service's system principal, and whether the caller may see
    the tenant is decided here by `libs.visibility.sees`, the rule accounts applies. A read on
    the hot path passes `cached=True`: the answer then comes from the process's `TenantCache`
    (one per process, shared by every AccountsPeer on the same Channels), so it makes no call to
    accounts and is at most the cache's bound stale. Without it (writes, quota decisions) the
    answer is fresh, so a suspension or a deletion refuses the next write at once; it refreshes
    the cache too."""

    service = "accounts"

    def __init__(self, channels: Channels, signer: Signer, timeout: float = 5.0, *, service: str = ""):
        super().__init__(channels, signer, timeout, service=service)
        self.cache = channels.shared(
            "tenant-cache",
            lambda: TenantCache(
                lambda: events.remote_source(channels, signer, "accounts")(None),
                channels.settings.tenant_cache_ttl.total_seconds(),
            ),
        )

    def tenants_stub(self) -> accounts_pb2_grpc.TenantServiceStub:
        return accounts_pb2_grpc.TenantServiceStub(self.channel)

    async def _tenant(self, ref: str, cached: bool) -> accounts_pb2.Tenant:
        return await self.cache.tenant(
            ref,
            lambda: self.call(
                self.tenants_stub().ResolveTenant,
                accounts_pb2.ResolveTenantRequest(tenant=ref),
                kind="tenant",
                ident=ref,
            ),
            fresh=not cached,
        )

    async def _limits(self, tenant_id: str, cached: bool) -> accounts_pb2.TenantLimits:
        return await self.cache.limits(
            tenant_id,
            lambda: self.call(
                self.tenants_stub().GetTenantLimits,
                accounts_pb2.GetTenantLimitsRequest(tenant_id=tenant_id),
                kind="tenant",
                ident=tenant_id,
            ),
            fresh=not cached,
        )

    @staticmethod
    def _visible(caller: Principal | None, t: accounts_pb2.Tenant, ref: str) -> None:
        if caller is not None and not sees(caller, t.account_id, t.id):
            raise not_found("tenant", ref)

    async def resolve_tenant(
        self, caller: Principal | None, tenant: str, *, cached: bool = False
    ) -> accounts_pb2.Tenant:
        """The tenant by name or id; `caller` None: this service's system principal."""
        t = await self._tenant(tenant, cached)
        self._visible(caller, t, tenant)
        return t

    async def tenant_limits(
        self, caller: Principal | None, tenant_id: str, *, cached: bool = False
    ) -> accounts_pb2.TenantLimits:
        if caller is None or is_system(caller):
            return await self._limits(tenant_id, cached)  # sees every tenant: nothing to check
        return (await self.tenant_and_limits(caller, tenant_id, cached=cached))[1]

    async def tenant_and_limits(
        self, caller: Principal | None, tenant_id: str, *, cached: bool = False
    ) -> tuple[accounts_pb2.Tenant, accounts_pb2.TenantLimits]:
        """Both at once (one round trip's time when fetched): the visibility check and the
        quota."""
        t, lim = await asyncio.gather(self._tenant(tenant_id, cached), self._limits(tenant_id, cached))
        self._visible(caller, t, tenant_id)
        return t, lim


async def by_id(
    load: Callable[[], Awaitable[Row | None]],
    tenant_of: Callable[[Row], str],
    resolve: Callable[[str], Awaitable[TenantT]],
    *,
    kind: str,
    ident: str,
) -> tuple[Row, TenantT]:
    """The one shape of a lookup by bare id: the row in one read (`load`, which may narrow by
    the caller's scope in its WHERE), then its tenant as the caller may see it (`resolve`:
    AccountsPeer's cache, no statement). A missing row and one in a tenant the caller may not
    see are the same NOT_FOUND of `kind` `ident`."""
    row = await load()
    if row is None:
        raise not_found(kind, ident)
    try:
        tenant = await resolve(tenant_of(row))
    except NotFound:
        raise not_found(kind, ident) from None
    return row, tenant
