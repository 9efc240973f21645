"""The databases service's view of accounts: tenants as the caller may see them and their plan
limits (libs.peers.AccountsPeer: cached, the visibility rule of libs/visibility.py), the
tenant's SCRAM verifier, and the events that say a tenant's credentials were rotated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from ctrlmesh.accounts.v1 import accounts_pb2
from ctrlmesh.common.v1 import internal_pb2

from libs import events
from libs.peers import AccountsPeer
from libs.principal import Principal


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


class Accounts(AccountsPeer):
    async def tenant_ref(self, caller: Principal, tenant: str, *, cached: bool = False) -> TenantRef:
        """The tenant by name or id as the caller may see it; NOT_FOUND when it may not.
        `cached`: from the tenant cache (reads), else fresh from accounts (writes)."""
        t = await self.resolve_tenant(caller, tenant, cached=cached)
        return TenantRef(t.id, t.name, t.account_id, t.status, t.pg_user)

    async def limits(self, tenant_id: str) -> Limits:
        lim = await self.tenant_limits(None, tenant_id)
        return Limits(
            lim.status, lim.account_plan, lim.plan_limits.max_databases, tuple(lim.plan_limits.sizes)
        )

    async def role_verifier(self, pg_user: str) -> str:
        """The tenant's current SCRAM verifier: the password of its role inside every compute."""
        c = await self.call(
            self.tenants_stub().LookupPgCredentials,
            accounts_pb2.LookupPgCredentialsRequest(pg_user=pg_user),
            kind="pg_user",
            ident=pg_user,
        )
        return c.scram_verifier

    def watch(self, types: list[str], after: int | None) -> AsyncIterator[internal_pb2.Event]:
        """accounts' own event stream (every tenant), from after `after` or from now (then led
        by a `stream.head` event)."""
        return events.remote_source(self._channels, self._signer, "accounts", types=types)(after)
