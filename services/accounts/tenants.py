"""Tenants: SPG99's tenants with their PostgreSQL credentials (shown, rotated, looked up by the
PG Gateway), cascading deletes, and the Ctrl Plane admin surface (update, suspend, quota).

Every read goes through the caller's scope, so a tenant the principal may not see is NOT_FOUND
exactly like a missing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs import ids, names
from libs.crypto import Keyring
from libs.db import Database
from libs.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    PermissionDenied,
    not_found,
)
from libs.outbox import Outbox
from libs.principal import Principal, is_global
from libs.timeutil import now
from libs.visibility import sees
from services.accounts import repository as repo
from services.accounts.access import require_global, require_system, scope_of
from services.accounts.billing import Plan, plan_of
from services.accounts.crypto import new_password, new_pg_user, scram_verifier
from services.accounts.repository import EVERYTHING, Scope, TenantRow

# Ctrl Plane's default tenant quota.
DEFAULT_QUOTA = {
    "max_instances": 5,
    "max_cpu_millis": 4000,
    "max_memory_mb": 8192,
    "max_disk_mb": 20480,
    "max_domains": 10,
    "max_secrets": 50,
}

# What a tenant may own elsewhere; any of it blocks a plain (non-cascading) delete.
OWNED = ("databases", "instances", "domains", "secrets", "managed_databases")


class Owners(Protocol):
    """The services that own tenant resources, as accounts sees them (services/accounts/peers.py)."""

    async def count(
        self, tenant_ids: list[str], owners: tuple[str, ...] = ...
    ) -> dict[str, dict[str, int]]: ...

    async def purge(self, tenant_id: str) -> bool: ...


def slugify(name: str) -> str:
    return names.slugify(name, "tenant")


@dataclass(frozen=True)
class TenantView:
    tenant: TenantRow
    db_count: int = 0


@dataclass(frozen=True)
class Credentials:
    """A tenant's PostgreSQL login (the password in clear: shown to its owner only)."""

    tenant: TenantRow
    pg_password: str
    dsn_template: str


@dataclass(frozen=True)
class TenantLimits:
    tenant: TenantRow
    account_plan: str
    plan: Plan


class Tenants:
    def __init__(
        self, db: Database, keyring: Keyring, outbox: Outbox, peers: Owners, *, dsn_host: str, dsn_port: int
    ):
        self.db = db
        self.keyring = keyring
        self.outbox = outbox
        self.peers = peers
        self.dsn_host = dsn_host
        self.dsn_port = dsn_port

    async def _find(self, s: AsyncSession, scope: Scope, ref: str, *, lock: bool = False) -> TenantRow:
        """A visible tenant by name or id; NOT_FOUND otherwise (same answer as a missing one)."""
        t = await repo.find_tenant(s, scope, ref, lock=lock)
        if t is None:
            raise not_found("tenant", ref)
        return t

    async def _db_counts(self, tenants: list[TenantRow]) -> dict[str, int]:
        # Only the databases service holds databases: one call, not one per owner.
        counts = await self.peers.count([t.id for t in tenants], owners=("databases",))
        return {tid: c.get("databases", 0) for tid, c in counts.items()}

    def _credentials(self, t: TenantRow, password: str) -> Credentials:
        dsn = f"postgres://{t.pg_user}:{password}@{self.dsn_host}:{self.dsn_port}/<db-name>?sslmode=require"
        return Credentials(t, password, dsn)

    def _password(self, t: TenantRow) -> str:
        return self.keyring.decrypt_str(t.pg_password_enc, aad=t.id)

    async def _publish(self, s: AsyncSession, kind: str, t: TenantRow, data: dict[str, Any]) -> None:
        await self.outbox.publish(
            s, kind, resource="tenant", resource_id=t.id, data=data, tenant_id=t.id, account_id=t.account_id
        )

    # -- SPG99 tenants ----------------------------------------------------------------------

    async def create_tenant(
        self,
        p: Principal,
        name: str,
        *,
        slug: str = "",
        plan: str = "",
        external_id: str = "",
        quota: dict[str, int] | None = None,
        metadata: dict[str, Any] | None = None,
        account_id: str = "",
        admin: bool = False,
    ) -> Credentials:
        """A new tenant and its PostgreSQL password (shown this once)."""
        if admin:
            require_global(p)
        else:
            if p.scope == "tenant":
                raise PermissionDenied("a tenant-scoped key cannot create tenants")
            if not is_global(p) and not p.permissions.can_create_tenant:
                raise PermissionDenied("this key lacks can_create_tenant")
        if account_id and not is_global(p):
            raise PermissionDenied("only a global key can create a tenant in another account")
        owner = account_id or p.account_id
        password = new_password()
        t = now()
        tenant_id = ids.new_id("ten")
        slug = slug or slugify(name)
        values: dict[str, Any] = {
            "id": tenant_id,
            "account_id": owner,
            "name": name,
            "slug": slug,
            "plan": plan or "free",
            "status": "active",
            "external_id": external_id,
            "metadata": metadata or {},
            "quota": {**DEFAULT_QUOTA, **(quota or {})},
            "suspended_at": None,
            "suspend_reason": "",
            "pg_user": new_pg_user(),
            "scram_verifier": scram_verifier(password),
            "pg_password_enc": self.keyring.encrypt_str(password, aad=tenant_id),
            "created_at": t,
            "updated_at": t,
        }
        async with self.outbox.session() as s:
            # The account row lock serialises concurrent creates, so the plan cap holds.
            acct = await repo.get_account(s, owner, lock=True)
            if acct is None:
                raise not_found("account", owner)
            plan_limits = plan_of(acct.plan)
            if (
                plan_limits.max_tenants
                and await repo.count_account_tenants(s, owner) >= plan_limits.max_tenants
            ):
                raise LimitExceeded(
                    f"the {acct.plan} plan allows {plan_limits.max_tenants} tenant(s)",
                    details={"limit": "max_tenants", "max": plan_limits.max_tenants},
                )
            for col, value in (("name", name), ("slug", slug)):
                if await repo.tenant_taken(s, col, value):
                    raise AlreadyExists(
                        f"a tenant with {col} {value!r} already exists", details={"field": col}
                    )
            try:
                tenant = await repo.insert_tenant(s, values)
            except IntegrityError as err:
                raise AlreadyExists("a tenant with that name or slug already exists") from err
            await self._publish(
                s, "tenant.created", tenant, {"id": tenant.id, "name": name, "status": "active"}
            )
        return self._credentials(tenant, password)

    async def list_tenants(self, p: Principal, limit: int, offset: int) -> tuple[list[TenantView], int]:
        rows, total = await self.db.read(lambda s: repo.list_tenants(s, scope_of(p), limit, offset))
        counts = await self._db_counts(rows)
        return [TenantView(t, counts.get(t.id, 0)) for t in rows], total

    async def get_tenant(self, p: Principal, ref: str) -> TenantView:
        t = await self.db.read(lambda s: self._find(s, scope_of(p), ref))
        return TenantView(t, (await self._db_counts([t])).get(t.id, 0))

    async def credentials(self, p: Principal, ref: str) -> Credentials:
        t = await self.db.read(lambda s: self._find(s, scope_of(p), ref))
        return self._credentials(t, self._password(t))

    async def rotate_credentials(self, p: Principal, ref: str) -> Credentials:
        password = new_password()
        async with self.outbox.session() as s:
            # Visibility first, so another tenant's name is 404 exactly like a missing one.
            t = await self._find(s, scope_of(p), ref, lock=True)
            # A new password cuts off every application of the tenant: a tenant key needs the flag.
            if p.scope == "tenant" and not p.permissions.can_rotate_credentials:
                raise PermissionDenied("this key lacks can_rotate_credentials")
            t = await repo.update_tenant(
                s,
                t.id,
                {
                    "pg_password_enc": self.keyring.encrypt_str(password, aad=t.id),
                    "scram_verifier": scram_verifier(password),
                    "updated_at": now(),
                },
            )
            await self._publish(
                s, "tenant.credentials_rotated", t, {"id": t.id, "name": t.name, "pg_user": t.pg_user}
            )
        return self._credentials(t, password)

    async def delete_tenant(
        self, p: Principal, ref: str, cascade: bool, *, admin: bool = False
    ) -> TenantRow | None:
        """None when the tenant is gone at once; the tenant in `deleting` when a cascade runs."""
        if admin:
            require_global(p)
        if not is_global(p) and not p.permissions.can_delete:
            raise PermissionDenied("this key lacks can_delete")
        scope = scope_of(p)
        async with self.db.session() as s:
            t = await self._find(s, scope, ref)
        if t.status == "deleting":
            return t
        counts = (await self.peers.count([t.id])).get(t.id, {})
        owned = {k: v for k, v in counts.items() if v and k in OWNED}
        async with self.outbox.session() as s:
            t = await self._find(s, scope, ref, lock=True)
            if not owned:
                await repo.delete_tenant(s, t.id)
                await self._publish(s, "tenant.deleted", t, {"id": t.id, "name": t.name})
                return None
            if not cascade:
                what = ", ".join(f"{v} {k}" for k, v in owned.items())
                raise InvalidState(
                    f"tenant {t.name!r} still has {what}; delete them first or pass cascade=true",
                    details=owned,
                )
            t = await repo.update_tenant(s, t.id, {"status": "deleting", "updated_at": now()})
            await self._publish(s, "tenant.deleting", t, {"id": t.id, "name": t.name, "status": "deleting"})
        return t

    async def reconcile_deleting(self) -> int:
        """Drive every `deleting` tenant to gone: purge in each owner, then drop the row."""
        async with self.db.session() as s:
            pending = await repo.deleting_tenant_ids(s)
        finished = 0
        for tenant_id in pending:
            if not await self.peers.purge(tenant_id):
                continue
            async with self.outbox.session() as s:
                t = await repo.delete_tenant(s, tenant_id, status="deleting")
                if t is not None:
                    await self._publish(s, "tenant.deleted", t, {"id": t.id, "name": t.name})
            finished += 1
        return finished

    async def resolve(self, p: Principal, ref: str) -> TenantView:
        """The tenant as `p` may see it: the rule of libs/visibility.py, the same function the
        callers apply to the tenants they cache."""
        t = await self.db.read(lambda s: repo.find_tenant(s, EVERYTHING, ref))
        if t is None or not sees(p, t.account_id, t.id):
            raise not_found("tenant", ref)
        return TenantView(t)

    async def pg_credentials(self, p: Principal, pg_user: str) -> Credentials:
        """The PG Gateway's login lookup (a system caller)."""
        require_system(p)
        t = await self.db.read(lambda s: repo.tenant_by_pg_user(s, pg_user))
        if t is None:
            raise not_found("pg_user", pg_user)
        return self._credentials(t, self._password(t))

    async def limits(self, p: Principal, tenant_id: str) -> TenantLimits:
        t, plan = await self.db.read(lambda s: self._limits(s, scope_of(p), tenant_id))
        return TenantLimits(t, plan, plan_of(plan))

    async def _limits(self, s: AsyncSession, scope: Scope, tenant_id: str) -> tuple[TenantRow, str]:
        found = await repo.tenant_with_plan(s, scope, tenant_id)
        if found is None:
            raise not_found("tenant", tenant_id)
        return found

    # -- Ctrl Plane admin -------------------------------------------------------------------

    async def admin_list(
        self, p: Principal, status: str, cursor: str, limit: int
    ) -> tuple[list[TenantRow], str, int]:
        require_global(p)
        async with self.db.session() as s:
            return await repo.tenant_page(s, EVERYTHING, status, cursor, limit)

    async def admin_get(self, p: Principal, tenant_id: str) -> TenantView:
        require_global(p)
        return await self.get_tenant(p, tenant_id)

    async def admin_update(self, p: Principal, tenant_id: str, changes: dict[str, Any]) -> TenantView:
        require_global(p)
        async with self.outbox.session() as s:
            t = await self._find(s, EVERYTHING, tenant_id, lock=True)
            values: dict[str, Any] = {
                k: changes[k] for k in ("plan", "external_id", "metadata") if k in changes
            }
            if "name" in changes and changes["name"] != t.name:
                if await repo.tenant_taken(s, "name", changes["name"], besides=t.id):
                    raise AlreadyExists(
                        f"a tenant named {changes['name']!r} already exists", details={"field": "name"}
                    )
                values["name"] = changes["name"]
            t = await repo.update_tenant(s, t.id, {**values, "updated_at": now()})
            await self._publish(s, "tenant.updated", t, {"id": t.id, "name": t.name, "plan": t.plan})
        return await self.get_tenant(p, t.id)

    async def set_suspended(self, p: Principal, tenant_id: str, suspended: bool, reason: str) -> None:
        require_global(p)
        async with self.outbox.session() as s:
            t = await self._find(s, EVERYTHING, tenant_id, lock=True)
            if t.status == "deleting":
                raise InvalidState("the tenant is being deleted")
            if suspended:
                values: dict[str, Any] = {
                    "status": "suspended",
                    "suspended_at": now(),
                    "suspend_reason": reason,
                }
            else:
                values = {"status": "active", "suspended_at": None, "suspend_reason": ""}
            t = await repo.update_tenant(s, t.id, {**values, "updated_at": now()})
            kind = "tenant.suspended" if suspended else "tenant.unsuspended"
            await self._publish(s, kind, t, {"id": t.id, "name": t.name, "reason": reason})

    async def get_quota(self, p: Principal, tenant_id: str) -> tuple[TenantRow, dict[str, int]]:
        """The tenant's quota and what it uses of it now (counted by the owning services)."""
        require_global(p)
        async with self.db.session() as s:
            t = await self._find(s, EVERYTHING, tenant_id)
        used = (await self.peers.count([t.id])).get(t.id, {})
        return t, used

    async def set_quota(self, p: Principal, tenant_id: str, quota: dict[str, int]) -> None:
        require_global(p)
        bad = {k: "must be >= 0" for k, v in quota.items() if v < 0}
        if bad:
            raise InvalidArgument(
                "quota values must not be negative", fields={f"quota.{k}": v for k, v in bad.items()}
            )
        async with self.outbox.session() as s:
            t = await self._find(s, EVERYTHING, tenant_id, lock=True)
            await repo.update_tenant(s, t.id, {"quota": quota, "updated_at": now()})
            await self.outbox.publish(
                s,
                "quota.updated",
                resource="quota",
                resource_id=t.id,
                data={"id": t.id, "quota": quota},
                tenant_id=t.id,
                account_id=t.account_id,
            )
