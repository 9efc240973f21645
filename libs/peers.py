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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from ctrlmesh.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

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
from libs.principal import Principal

# Reasons that say the peer itself failed: they never pass through as the peer's refusal.
_PEER_FAILURES = frozenset(("Internal", "Unavailable"))

Resp = TypeVar("Resp")


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


class AccountsPeer(Peer):
    """The accounts service as the other services ask it about a tenant: the tenant as the
    caller may see it (NOT_FOUND when it may not) and its status, plan and quota. Each service
    keeps from the answers the few fields it needs."""

    service = "accounts"

    def tenants_stub(self) -> accounts_pb2_grpc.TenantServiceStub:
        return accounts_pb2_grpc.TenantServiceStub(self.channel)

    async def resolve_tenant(self, caller: Principal | None, tenant: str) -> accounts_pb2.Tenant:
        """The tenant by name or id; `caller` None: this service's system principal."""
        return await self.call(
            self.tenants_stub().ResolveTenant,
            accounts_pb2.ResolveTenantRequest(tenant=tenant),
            caller=caller,
            kind="tenant",
            ident=tenant,
        )

    async def tenant_limits(self, caller: Principal | None, tenant_id: str) -> accounts_pb2.TenantLimits:
        return await self.call(
            self.tenants_stub().GetTenantLimits,
            accounts_pb2.GetTenantLimitsRequest(tenant_id=tenant_id),
            caller=caller,
            kind="tenant",
            ident=tenant_id,
        )

    async def tenant_and_limits(
        self, caller: Principal | None, tenant_id: str
    ) -> tuple[accounts_pb2.Tenant, accounts_pb2.TenantLimits]:
        """Both at once (one round trip's time): the visibility check and the quota."""
        return await asyncio.gather(
            self.resolve_tenant(caller, tenant_id), self.tenant_limits(caller, tenant_id)
        )
