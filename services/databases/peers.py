"""The databases service's view of accounts: tenants (resolved with the caller's own principal, so
visibility rules stay in accounts), plan limits, the tenant's SCRAM verifier, and the events
that say a tenant's credentials were rotated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from ctrlmesh.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from ctrlmesh.common.v1 import internal_pb2
from google.rpc import error_details_pb2, status_pb2

from libs.clients import Channels, Signer
from libs.errors import REASONS, CtrlmeshError, Unavailable, not_found
from libs.principal import Principal

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class TenantRef:
    id: str
    name: str
    account_id: str
    # "active", "suspended" or "deleting".
    status: str
    pg_user: str


@dataclass(frozen=True)
class Limits:
    status: str
    plan: str
    # 0 = no cap.
    max_databases: int
    sizes: tuple[str, ...]


def _reason(err: grpc.aio.AioRpcError) -> str | None:
    for key, value in err.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason
    return None


def _translate(err: grpc.aio.AioRpcError, kind: str, ident: str) -> CtrlmeshError:
    """A failed accounts call as our own error: NOT_FOUND stays the one not-found answer,
    a reasoned refusal keeps its reason, anything else is accounts being unavailable."""
    if err.code() == grpc.StatusCode.NOT_FOUND:
        return not_found(kind, ident)
    reason = _reason(err)
    if reason in REASONS and REASONS[reason].code == err.code() and reason not in ("Internal", "Unavailable"):
        return CtrlmeshError(err.details() or reason, reason=reason)
    return Unavailable("the accounts service is unavailable", details={"service": "accounts"})


class Accounts:
    def __init__(self, channels: Channels, signer: Signer, timeout: float = 5.0):
        self._channels = channels
        self._signer = signer
        self._timeout = timeout

    def _tenants(self) -> accounts_pb2_grpc.TenantServiceStub:
        return accounts_pb2_grpc.TenantServiceStub(self._channels.get("accounts"))

    async def resolve_tenant(self, caller: Principal, tenant: str) -> TenantRef:
        """The tenant by name or id as the caller may see it; NOT_FOUND when it may not."""
        try:
            t = await self._tenants().ResolveTenant(
                accounts_pb2.ResolveTenantRequest(tenant=tenant),
                metadata=self._signer.metadata(caller),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "tenant", tenant) from None
        return TenantRef(t.id, t.name, t.account_id, t.status, t.pg_user)

    async def limits(self, tenant_id: str) -> Limits:
        try:
            lim = await self._tenants().GetTenantLimits(
                accounts_pb2.GetTenantLimitsRequest(tenant_id=tenant_id),
                metadata=self._signer.system(),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "tenant", tenant_id) from None
        return Limits(
            lim.status, lim.account_plan, lim.plan_limits.max_databases, tuple(lim.plan_limits.sizes)
        )

    async def role_verifier(self, pg_user: str) -> str:
        """The tenant's current SCRAM verifier: the password of its role inside every compute."""
        try:
            c = await self._tenants().LookupPgCredentials(
                accounts_pb2.LookupPgCredentialsRequest(pg_user=pg_user),
                metadata=self._signer.system(),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, "pg_user", pg_user) from None
        return c.scram_verifier

    async def watch(self, types: list[str], last_event_id: str) -> AsyncIterator[internal_pb2.Event]:
        """accounts' event stream (system principal: every tenant), from after `last_event_id`."""
        stub = accounts_pb2_grpc.EventServiceStub(self._channels.get("accounts"))
        call = stub.WatchEvents(
            accounts_pb2.WatchEventsRequest(type=types, last_event_id=last_event_id),
            metadata=self._signer.system(),
        )
        async for event in call:
            yield event
