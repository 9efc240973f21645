"""SQL for the accounts service (SQLAlchemy over one AsyncSession per unit of work).

Rows leave as frozen dataclasses, never as ORM objects. Every read of tenant data takes a
`Scope` (what the caller may see): a row outside it is simply not found, exactly like a missing
one. The few system reads (authentication by token digest, PG credentials by user, the delete
reconciler's scan, platform-wide counts) say so in their names and docstrings.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from libs.pagination import keyset_page, page_limit
from libs.visibility import EVERYTHING as EVERYTHING
from libs.visibility import Scope as Scope
from services.accounts.models import SCHEMA, Account, ApiKey, AuditEntry, Base, Tenant


@dataclass(frozen=True)
class AccountRow:
    id: str
    email: str
    name: str
    company: str
    plan: str
    is_platform: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TenantRow:
    id: str
    account_id: str
    name: str
    slug: str
    plan: str
    status: str
    external_id: str
    metadata: dict[str, Any]
    quota: dict[str, int]
    suspended_at: datetime | None
    suspend_reason: str
    pg_user: str
    pg_password_enc: str
    scram_verifier: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class KeyRow:
    id: str
    account_id: str
    tenant_id: str | None
    name: str
    scope: str
    can_create_tenant: bool
    can_create_db: bool
    can_scale: bool
    can_delete: bool
    can_rotate_credentials: bool
    token_hash: str
    prefix: str
    expires_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class AuditRow:
    id: str
    tenant_id: str
    actor_id: str
    actor_type: str
    resource: str
    resource_id: str
    action: str
    outcome: str
    reason: str
    service: str
    method: str
    trace_id: str
    created_at: datetime


# The one column whose ORM attribute is not its name (`metadata` is reserved by the ORM).
_ATTR = {"metadata": "metadata_"}
_TENANTS = Base.metadata.tables[f"{SCHEMA}.tenants"]
_ACCOUNTS = Base.metadata.tables[f"{SCHEMA}.accounts"]


def _row(cls: Any, obj: Any) -> Any:
    """The frozen row of an ORM object."""
    return cls(**{f.name: getattr(obj, _ATTR.get(f.name, f.name)) for f in fields(cls)})


def _from_mapping(cls: Any, m: Any) -> Any:
    """The frozen row of a Core result (keys are column names). Writes go through Core, so the
    session's identity map never holds an object older than the row."""
    return None if m is None else cls(**{f.name: m[f.name] for f in fields(cls)})


def _tenant(obj: Tenant | None) -> TenantRow | None:
    return None if obj is None else _row(TenantRow, obj)


def _key(obj: ApiKey | None) -> KeyRow | None:
    return None if obj is None else _row(KeyRow, obj)


def _account(obj: Account | None) -> AccountRow | None:
    return None if obj is None else _row(AccountRow, obj)


def _tenant_values(values: dict[str, Any]) -> dict[str, Any]:
    return {_ATTR.get(k, k): v for k, v in values.items()}


# -- accounts ----------------------------------------------------------------------------------


async def platform_account(s: AsyncSession, *, lock: bool = False) -> AccountRow | None:
    q = select(Account).where(Account.is_platform)
    if lock:
        q = q.with_for_update()
    return _account(await s.scalar(q))


async def get_account(s: AsyncSession, account_id: str, *, lock: bool = False) -> AccountRow | None:
    return _account(await s.get(Account, account_id, with_for_update=lock))


async def insert_account(s: AsyncSession, values: dict[str, Any]) -> AccountRow:
    acct = Account(**values)
    s.add(acct)
    await s.flush()
    return _row(AccountRow, acct)


async def update_account(s: AsyncSession, account_id: str, values: dict[str, Any]) -> AccountRow | None:
    q = update(_ACCOUNTS).where(_ACCOUNTS.c.id == account_id).values(**values).returning(_ACCOUNTS)
    row: AccountRow | None = _from_mapping(AccountRow, (await s.execute(q)).mappings().first())
    return row


# -- API keys ----------------------------------------------------------------------------------


def _keys(scope: Scope) -> Select[tuple[ApiKey]]:
    q = select(ApiKey).where(ApiKey.revoked_at.is_(None))
    if scope.account_id:
        q = q.where(ApiKey.account_id == scope.account_id)
    if scope.tenant_id:
        q = q.where(ApiKey.tenant_id == scope.tenant_id)
    return q


async def insert_key(s: AsyncSession, values: dict[str, Any]) -> KeyRow:
    key = ApiKey(**values)
    s.add(key)
    await s.flush()
    return _row(KeyRow, key)


async def key_by_token_hash(s: AsyncSession, digest: str) -> KeyRow | None:
    """System read: the key a presented token hashes to (authentication, any scope)."""
    return _key(await s.scalar(select(ApiKey).where(ApiKey.token_hash == digest)))


async def touch_key(s: AsyncSession, key_id: str, at: datetime) -> None:
    await s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=at))


async def active_global_keys(s: AsyncSession) -> int:
    """System read: how many unrevoked global keys exist (bootstrap mints one when none)."""
    q = select(func.count()).select_from(ApiKey).where(ApiKey.scope == "global", ApiKey.revoked_at.is_(None))
    return int(await s.scalar(q) or 0)


async def lock_live_global_keys(s: AsyncSession, at: datetime) -> list[str]:
    """System read: the ids of every live global key, locked in id order (so two concurrent
    revokes cannot deadlock, and the second sees the first's commit)."""
    q = (
        select(ApiKey.id)
        .where(
            ApiKey.scope == "global",
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > at),
        )
        .order_by(ApiKey.id)
        .with_for_update()
    )
    return list(await s.scalars(q))


async def find_key(s: AsyncSession, scope: Scope, key_id: str, *, lock: bool = False) -> KeyRow | None:
    """An unrevoked key the scope may see; with `lock`, re-read under a row lock."""
    q = _keys(scope).where(ApiKey.id == key_id)
    if lock:
        q = q.with_for_update().execution_options(populate_existing=True)
    return _key(await s.scalar(q))


async def list_keys(s: AsyncSession, scope: Scope, limit: int, offset: int) -> tuple[list[KeyRow], int]:
    q = _keys(scope)
    total = await s.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = await s.scalars(q.order_by(ApiKey.id).limit(page_limit(limit, 100)).offset(offset))
    return [_row(KeyRow, k) for k in rows], int(total)


async def revoke_key(s: AsyncSession, key_id: str, at: datetime) -> None:
    await s.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=at))


# -- tenants -----------------------------------------------------------------------------------


def _tenants(scope: Scope) -> Select[tuple[Tenant]]:
    q = select(Tenant)
    if scope.tenant_id:
        return q.where(Tenant.id == scope.tenant_id)
    if scope.account_id:
        return q.where(Tenant.account_id == scope.account_id)
    return q


async def find_tenant(s: AsyncSession, scope: Scope, ref: str, *, lock: bool = False) -> TenantRow | None:
    """A tenant the scope may see, by name or id."""
    q = _tenants(scope).where(or_(Tenant.name == ref, Tenant.id == ref))
    if lock:
        q = q.with_for_update()
    return _tenant(await s.scalar(q))


async def tenant_with_plan(s: AsyncSession, scope: Scope, ref: str) -> tuple[TenantRow, str] | None:
    """A tenant the scope may see, by name or id, with its account's plan: one statement."""
    q = (
        select(_TENANTS, _ACCOUNTS.c.plan.label("account_plan"))
        .join(_ACCOUNTS, _ACCOUNTS.c.id == _TENANTS.c.account_id)
        .where(or_(_TENANTS.c.name == ref, _TENANTS.c.id == ref))
    )
    if scope.tenant_id:
        q = q.where(_TENANTS.c.id == scope.tenant_id)
    if scope.account_id:
        q = q.where(_TENANTS.c.account_id == scope.account_id)
    m = (await s.execute(q)).mappings().first()
    return None if m is None else (_from_mapping(TenantRow, m), str(m["account_plan"]))


async def find_tenant_by_name(s: AsyncSession, scope: Scope, name: str) -> TenantRow | None:
    return _tenant(await s.scalar(_tenants(scope).where(Tenant.name == name)))


async def tenant_name(s: AsyncSession, scope: Scope, tenant_id: str | None) -> str:
    """The name of a tenant the scope may see; empty for no tenant (or one out of scope)."""
    if not tenant_id:
        return ""
    return (
        await s.scalar(_tenants(scope).with_only_columns(Tenant.name).where(Tenant.id == tenant_id))
    ) or ""


async def list_tenants(s: AsyncSession, scope: Scope, limit: int, offset: int) -> tuple[list[TenantRow], int]:
    q = _tenants(scope)
    total = await s.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = await s.scalars(
        q.order_by(Tenant.created_at, Tenant.id).limit(page_limit(limit, 100)).offset(offset)
    )
    return [_row(TenantRow, t) for t in rows], int(total)


async def tenant_page(
    s: AsyncSession, scope: Scope, status: str, cursor: str, limit: int
) -> tuple[list[TenantRow], str, int]:
    """Newest first, keyset-paged (the Ctrl Plane admin list)."""
    q = _tenants(scope)
    if status:
        q = q.where(Tenant.status == status)
    rows, next_cursor, total = await keyset_page(s, q, Tenant.id, cursor, limit, 50)
    return [_row(TenantRow, t) for t in rows], next_cursor, total


async def tenant_ids(s: AsyncSession, scope: Scope, account_id: str) -> list[str]:
    """The ids of the account's tenants the scope may see."""
    return list(
        await s.scalars(_tenants(scope).with_only_columns(Tenant.id).where(Tenant.account_id == account_id))
    )


async def count_account_tenants(s: AsyncSession, account_id: str) -> int:
    q = select(func.count()).select_from(Tenant).where(Tenant.account_id == account_id)
    return int(await s.scalar(q) or 0)


async def tenant_taken(s: AsyncSession, column: str, value: str, *, besides: str = "") -> bool:
    """System read: whether any tenant (of any account: names and slugs are global) uses
    `value` in `column` (`name` or `slug`), other than tenant `besides`."""
    q = select(Tenant.id).where(getattr(Tenant, column) == value)
    if besides:
        q = q.where(Tenant.id != besides)
    return await s.scalar(q) is not None


async def insert_tenant(s: AsyncSession, values: dict[str, Any]) -> TenantRow:
    """Raises IntegrityError when the name, slug or PostgreSQL user is taken."""
    t = Tenant(**_tenant_values(values))
    s.add(t)
    await s.flush()
    return _row(TenantRow, t)


async def update_tenant(s: AsyncSession, tenant_id: str, values: dict[str, Any]) -> TenantRow:
    """Update a tenant the caller holds locked (found in its scope first)."""
    q = update(_TENANTS).where(_TENANTS.c.id == tenant_id).values(**values).returning(_TENANTS)
    row: TenantRow | None = _from_mapping(TenantRow, (await s.execute(q)).mappings().first())
    assert row is not None, "update_tenant of a row the caller holds locked"
    return row


async def delete_tenant(s: AsyncSession, tenant_id: str, *, status: str = "") -> TenantRow | None:
    """Delete the tenant (only while it is in `status`, when given); the row as it was, or
    None when nothing matched."""
    q = delete(_TENANTS).where(_TENANTS.c.id == tenant_id)
    if status:
        q = q.where(_TENANTS.c.status == status)
    row: TenantRow | None = _from_mapping(
        TenantRow, (await s.execute(q.returning(_TENANTS))).mappings().first()
    )
    return row


async def deleting_tenant_ids(s: AsyncSession) -> list[str]:
    """System scan for the delete reconciler: only the keys of tenants in `deleting`."""
    return list(await s.scalars(select(Tenant.id).where(Tenant.status == "deleting")))


async def tenant_by_pg_user(s: AsyncSession, pg_user: str) -> TenantRow | None:
    """System read: the tenant a PostgreSQL user belongs to (the PG Gateway's login lookup)."""
    return _tenant(await s.scalar(select(Tenant).where(Tenant.pg_user == pg_user)))


async def platform_counts(s: AsyncSession) -> tuple[dict[str, int], int, int]:
    """System read: tenants by status, accounts, unrevoked keys (the admin stats)."""
    rows = (await s.execute(select(Tenant.status, func.count()).group_by(Tenant.status))).all()
    accounts = await s.scalar(select(func.count()).select_from(Account)) or 0
    keys = await s.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None))) or 0
    return {status: int(n) for status, n in rows}, int(accounts), int(keys)


# -- audit -------------------------------------------------------------------------------------


async def insert_audit(s: AsyncSession, values: dict[str, Any]) -> None:
    # Core, not the ORM's unit of work: the one INSERT runs now (an autocommit caller has no
    # commit that would flush it).
    await s.execute(insert(AuditEntry).values(**values))


async def audit_page(
    s: AsyncSession, filters: dict[str, Any], cursor: str, limit: int
) -> tuple[list[AuditRow], str, int]:
    """System read (the platform's audit log): newest first, keyset-paged."""
    q = select(AuditEntry)
    for col in ("tenant_id", "resource", "action", "actor_id"):
        if filters.get(col):
            q = q.where(getattr(AuditEntry, col) == filters[col])
    if filters.get("since"):
        q = q.where(AuditEntry.created_at >= filters["since"])
    if filters.get("until"):
        q = q.where(AuditEntry.created_at <= filters["until"])
    rows, next_cursor, total = await keyset_page(s, q, AuditEntry.id, cursor, limit, 50)
    return [_row(AuditRow, e) for e in rows], next_cursor, total
