"""The instances service's view of tenants, through accounts' gRPC API (never its tables).

Calls made on behalf of a caller carry the caller's own principal (re-signed), so accounts
applies the caller's visibility: another tenant answers NOT_FOUND, exactly like a missing one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from libs import events
from libs import principal as principals
from libs.errors import NotFound
from libs.peers import AccountsPeer
from libs.reconcile import every


@dataclass(frozen=True)
class Limits:
    tenant_id: str
    account_id: str
    status: str
    max_instances: int
    max_cpu_millis: int
    max_memory_mb: int
    max_disk_mb: int

    @property
    def suspended(self) -> bool:
        return self.status == "suspended"


class Tenants(AccountsPeer):
    async def limits(self, p: principals.Principal, tenant_id: str) -> Limits:
        """The tenant's status, quota and account, as visible to `p` (NotFound otherwise)."""
        tenant, lim = await self.tenant_and_limits(p, tenant_id)
        q = lim.quota
        return Limits(
            tenant_id=tenant.id,
            account_id=tenant.account_id,
            status=lim.status,
            max_instances=q.max_instances,
            max_cpu_millis=q.max_cpu_millis,
            max_memory_mb=q.max_memory_mb,
            max_disk_mb=q.max_disk_mb,
        )

    async def watch_suspensions(
        self,
        load_cursor: Callable[[], Awaitable[int | None]],
        save_cursor: Callable[[int], Awaitable[None]],
        on_suspended: Callable[[str], Awaitable[None]],
    ) -> None:
        """Follow accounts' `tenant.suspended` events forever, resuming where the last process
        stopped, and hand each suspended tenant to `on_suspended`."""
        stream = events.remote_source(self._channels, self._signer, "accounts", types=["tenant.suspended"])

        async def follow() -> None:
            async for event in stream(await load_cursor()):
                if event.type == events.STREAM_HEAD:
                    await save_cursor(int(event.id))
                    continue
                try:
                    await on_suspended(event.tenant_id)
                except NotFound:
                    pass  # the tenant went meanwhile: nothing of it to stop
                await save_cursor(int(event.id))

        # An interrupted stream (accounts restarting, our principal aged out on a long stream) is
        # a failed pass: logged and counted, and reopened a second later from the saved cursor.
        await every("tenant suspension follower", 1.0, follow, first=0, jitter=0)
