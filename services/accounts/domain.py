"""Accounts domain logic: keys, scopes and visibility, tenants, plans, quotas, audit.

Plain Python over SQLAlchemy sessions; no gRPC here. Every tenant read goes through
`_visible`, so a tenant the principal may not see is NOT_FOUND exactly like a missing one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from scramp import ScramMechanism
from sqlalchemy import Select, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs import ids
from libs.crypto import Keyring
from libs.db import Database
from libs.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    PermissionDenied,
    Unauthenticated,
    not_found,
)
from libs.outbox import Outbox
from libs.pagination import keyset_page, page_limit
from libs.principal import Principal, is_global, is_system
from services.accounts.models import Account, ApiKey, AuditEntry, Tenant
from services.accounts.peers import Peers

# SPG99's four flags, then ctrlmesh's own (common.v1.Permissions documents each).
PERMISSIONS = ("can_create_tenant", "can_create_db", "can_scale", "can_delete", "can_rotate_credentials")


@dataclass(frozen=True)
class Plan:
    name: str
    max_tenants: int  # 0 = no cap
    max_databases: int
    max_compute_cu_hours: float
    max_egress_bytes: int
    sizes: tuple[str, ...]


PLANS = {
    "trial": Plan("trial", 1, 2, 10.0, 5 * 1024**3, ("L1",)),
    "standard_payg": Plan("standard_payg", 0, 0, 0.0, 0, ("L1", "L2", "L3", "L4", "L5")),
}

# Ctrl Plane's default tenant quota.
DEFAULT_QUOTA = {
    "max_instances": 5,
    "max_cpu_millis": 4000,
    "max_memory_mb": 8192,
    "max_disk_mb": 20480,
    "max_domains": 10,
    "max_secrets": 50,
}

_B62 = string.digits + string.ascii_letters
TOKEN_PREFIX = "cmk_"


def _b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out))


def new_token() -> str:
    """`cmk_` + 30 random base62 characters + a 6-character CRC32 checksum of them.

    The checksum lets the edge reject typos and junk without touching the database.
    """
    body = "".join(secrets.choice(_B62) for _ in range(30))
    return f"{TOKEN_PREFIX}{body}{_b62(zlib.crc32(body.encode()), 6)}"


def token_well_formed(token: str) -> bool:
    if not token.startswith(TOKEN_PREFIX) or len(token) != len(TOKEN_PREFIX) + 36:
        return False
    body, check = token[len(TOKEN_PREFIX) : -6], token[-6:]
    return hmac.compare_digest(_b62(zlib.crc32(body.encode()), 6), check)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier format, which the PG Gateway authenticates against."""
    salt, stored, server, it = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations
    )
    b64 = __import__("base64").b64encode
    return f"SCRAM-SHA-256${it}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


def slugify(name: str) -> str:
    out = []
    for ch in name.lower():
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif out and out[-1] != "-":
            out.append("-")
    return "".join(out).strip("-")[:63] or "tenant"


def now() -> datetime:
    return datetime.now(UTC)


def default_key_name() -> str:
    """The name of a key created without one: its UTC creation time, as neonctl names things."""
    return now().strftime("key-%Y%m%d-%H%M%S")


def add_key(
    s: AsyncSession,
    account_id: str,
    name: str,
    scope: str,
    tenant_id: str | None,
    perms: dict[str, bool],
    expires_at: datetime | None,
    token: str,
) -> ApiKey:
    key = ApiKey(
        id=ids.new_id("key"),
        account_id=account_id,
        tenant_id=tenant_id,
        name=name,
        scope=scope,
        token_hash=token_hash(token),
        prefix=token[:10],
        expires_at=expires_at,
        created_at=now(),
        **{k: bool(perms.get(k)) for k in PERMISSIONS},
    )
    s.add(key)
    return key


async def mint_break_glass_key(db: Database, outbox: Outbox, name: str, actor: str) -> tuple[ApiKey, str]:
    """A new global key in the platform account, written straight to the database (for an
    operator who has lost every global key), audited and announced like any other key."""
    async with db.session() as s:
        acct = await s.scalar(select(Account).where(Account.is_platform))
        if acct is None:
            raise InvalidState("the platform account does not exist yet: start the platform once first")
        token = new_token()
        key = add_key(s, acct.id, name, "global", None, dict.fromkeys(PERMISSIONS, True), None, token)
        await s.flush()
        s.add(
            AuditEntry(
                id=ids.new_id("aud"),
                created_at=now(),
                tenant_id="",
                actor_id=actor,
                actor_type="system",
                resource="api_key",
                resource_id=key.id,
                action="break_glass_create",
                outcome="success",
                reason="",
                service="admin_key",
                method="python -m libs.admin_key",
                trace_id="",
            )
        )
        await outbox.publish(
            s,
            "api_key.created",
            resource="api_key",
            resource_id=key.id,
            data={"id": key.id, "name": name, "scope": "global", "tenant": ""},
            tenant_id="",
            account_id=acct.id,
        )
    await outbox.notify()
    return key, token


@dataclass
class Created:
    """A freshly created tenant with the password shown once."""

    tenant: Tenant
    pg_password: str
    db_count: int = 0


@dataclass
class TenantView:
    tenant: Tenant
    db_count: int = 0


@dataclass
class BillingView:
    plan: Plan
    period_start: datetime
    period_end: datetime
    usage: dict[str, Any] = field(default_factory=dict)


class AccountsDomain:
    def __init__(
        self, db: Database, keyring: Keyring, outbox: Outbox, peers: Peers, *, dsn_host: str, dsn_port: int
    ):
        self.db = db
        self.keyring = keyring
        self.outbox = outbox
        self.peers = peers
        self.dsn_host = dsn_host
        self.dsn_port = dsn_port

    # -- bootstrap --------------------------------------------------------------------------

    async def bootstrap(self, admin_email: str, admin_key: str | None) -> str | None:
        """Ensure the platform account and a global key exist. Returns a newly generated token."""
        async with self.db.session() as s:
            acct = await s.scalar(select(Account).where(Account.is_platform).with_for_update())
            if acct is None:
                t = now()
                acct = Account(
                    id=ids.new_id("acct"),
                    email=admin_email,
                    name="Platform",
                    company="",
                    plan="standard_payg",
                    is_platform=True,
                    created_at=t,
                    updated_at=t,
                )
                s.add(acct)
                await s.flush()
            if admin_key is not None:
                if await s.scalar(select(ApiKey.id).where(ApiKey.token_hash == token_hash(admin_key))):
                    return None
                self._add_key(
                    s,
                    acct.id,
                    "bootstrap admin",
                    "global",
                    None,
                    dict.fromkeys(PERMISSIONS, True),
                    None,
                    admin_key,
                )
                return None
            has_global = await s.scalar(
                select(func.count())
                .select_from(ApiKey)
                .where(ApiKey.scope == "global", ApiKey.revoked_at.is_(None))
            )
            if has_global:
                return None
            token = new_token()
            self._add_key(
                s, acct.id, "bootstrap admin", "global", None, dict.fromkeys(PERMISSIONS, True), None, token
            )
            return token

    # -- accounts ---------------------------------------------------------------------------

    async def get_account(self, p: Principal) -> Account:
        async with self.db.session() as s:
            acct = await s.get(Account, p.account_id)
            if acct is None:
                raise not_found("account", p.account_id)
            return acct

    async def update_contact(self, p: Principal, email: str, name: str, company: str) -> Account:
        if p.scope == "tenant":
            raise PermissionDenied("a tenant-scoped key cannot change the account profile")
        async with self.db.session() as s:
            acct = await s.get(Account, p.account_id, with_for_update=True)
            if acct is None:
                raise not_found("account", p.account_id)
            acct.email, acct.name, acct.company, acct.updated_at = email, name, company, now()
            await self.outbox.publish(
                s,
                "account.updated",
                resource="account",
                resource_id=acct.id,
                data={"account_id": acct.id, "email": email},
                account_id=acct.id,
            )
        await self.outbox.notify()
        return acct

    async def create_account(
        self, p: Principal, email: str, name: str, company: str, plan: str
    ) -> tuple[Account, ApiKey, str]:
        if not is_global(p):
            raise PermissionDenied("only the platform (a global key) can create accounts")
        t = now()
        async with self.db.session() as s:
            acct = Account(
                id=ids.new_id("acct"),
                email=email,
                name=name,
                company=company,
                plan=plan,
                is_platform=False,
                created_at=t,
                updated_at=t,
            )
            s.add(acct)
            await s.flush()
            token = new_token()
            key = self._add_key(
                s, acct.id, "account owner", "account", None, dict.fromkeys(PERMISSIONS, True), None, token
            )
        return acct, key, token

    async def billing(self, p: Principal) -> tuple[Account, Plan, dict[str, Any], datetime, datetime]:
        """The account's plan and this period's usage; for a tenant-scoped key the usage of its
        own tenant only (other tenants' databases and storage are not its to see)."""
        acct = await self.get_account(p)
        plan = PLANS.get(acct.plan, PLANS["standard_payg"])
        t = now()
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        async with self.db.session() as s:
            q = select(Tenant.id).where(Tenant.account_id == acct.id)
            if p.scope == "tenant":
                q = q.where(Tenant.id == p.tenant_id)
            tenant_ids = list(await s.scalars(q))
        counts = await self.peers.count(tenant_ids)
        usage: dict[str, Any] = {
            "tenants": len(tenant_ids),
            "databases": 0,
            "compute_cu_hours": 0.0,
            "by_profile": {},
            "storage_bytes": 0,
            "egress_bytes": 0,
            # Percent of the account's caps only for whole-account usage: a tenant's share
            # would invite reading the rest of the account from it.
            "account_wide": p.scope != "tenant",
        }
        for c in counts.values():
            usage["databases"] += c.get("databases", 0)
            usage["storage_bytes"] += c.get("storage_bytes", 0)
            usage["egress_bytes"] += c.get("egress_bytes", 0)
            for k, v in c.items():
                if k.startswith("compute_cu_millihours_"):
                    prof = k.removeprefix("compute_cu_millihours_")
                    usage["by_profile"][prof] = usage["by_profile"].get(prof, 0.0) + v / 1000
        usage["compute_cu_hours"] = sum(usage["by_profile"].values())
        return acct, plan, usage, start, end

    # -- API keys ---------------------------------------------------------------------------

    def _add_key(
        self,
        s: AsyncSession,
        account_id: str,
        name: str,
        scope: str,
        tenant_id: str | None,
        perms: dict[str, bool],
        expires_at: datetime | None,
        token: str,
    ) -> ApiKey:
        return add_key(s, account_id, name, scope, tenant_id, perms, expires_at, token)

    async def authenticate(self, token: str) -> tuple[ApiKey, Account]:
        # Our own tokens carry a checksum: junk is refused without touching the database.
        # (A CTRLMESH_BOOTSTRAP_ADMIN_KEY may be any string, so other shapes go to the lookup.)
        if token.startswith(TOKEN_PREFIX) and not token_well_formed(token):
            raise Unauthenticated("invalid API key")
        digest = token_hash(token)
        async with self.db.session() as s:
            key = await s.scalar(select(ApiKey).where(ApiKey.token_hash == digest))
            # Constant-time compare of the stored digest, though the lookup is already by hash.
            if key is None or not hmac.compare_digest(key.token_hash, digest):
                raise Unauthenticated("invalid API key")
            if key.revoked_at is not None:
                raise Unauthenticated("API key revoked")
            t = now()
            if key.expires_at is not None and key.expires_at <= t:
                raise Unauthenticated("API key expired")
            acct = await s.get(Account, key.account_id)
            assert acct is not None
            if key.last_used_at is None or (t - key.last_used_at).total_seconds() > 60:
                await s.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=t))
            return key, acct

    def _keys_visible(self, p: Principal) -> Select[tuple[ApiKey]]:
        q = select(ApiKey).where(ApiKey.revoked_at.is_(None))
        if is_global(p):
            return q
        if p.scope == "account":
            return q.where(ApiKey.account_id == p.account_id)
        return q.where(ApiKey.account_id == p.account_id, ApiKey.tenant_id == p.tenant_id)

    async def get_key(self, p: Principal, key_id: str) -> tuple[ApiKey, str]:
        async with self.db.session() as s:
            key = await s.scalar(self._keys_visible(p).where(ApiKey.id == key_id))
            if key is None:
                raise not_found("api_key", key_id)
            return key, await self._tenant_name(s, key.tenant_id)

    async def _tenant_name(self, s: AsyncSession, tenant_id: str | None) -> str:
        if not tenant_id:
            return ""
        return (await s.scalar(select(Tenant.name).where(Tenant.id == tenant_id))) or ""

    async def create_key(
        self,
        p: Principal,
        name: str,
        scope: str,
        tenant: str,
        perms: dict[str, bool],
        expires_at: datetime | None,
        account_id: str,
    ) -> tuple[ApiKey, str, str]:
        if p.scope == "tenant" and scope != "tenant":
            raise PermissionDenied("a tenant-scoped key can only create tenant-scoped keys")
        if p.scope == "account" and scope == "global":
            raise PermissionDenied("only a global key can create global keys")
        if account_id and not is_global(p) and account_id != p.account_id:
            raise PermissionDenied("a key can only be created in the caller's own account")
        if not is_global(p):
            mine = {k: getattr(p.permissions, k) for k in PERMISSIONS}
            escalated = [k for k, v in perms.items() if v and not mine[k]]
            if escalated:
                raise PermissionDenied(
                    "a key cannot grant permissions its creator lacks",
                    details={"permissions": ",".join(escalated)},
                )
        if expires_at is not None and expires_at <= now():
            raise InvalidArgument("expires_at is in the past", fields={"expires_at": "must be in the future"})
        target_account = account_id or p.account_id
        name = name or default_key_name()
        async with self.db.session() as s:
            if await s.get(Account, target_account) is None:
                raise not_found("account", target_account)
            tenant_id = None
            if scope == "tenant":
                t = await s.scalar(self._visible(p).where(Tenant.name == tenant))
                if t is None or t.account_id != target_account:
                    raise not_found("tenant", tenant)
                tenant_id = t.id
            token = new_token()
            key = self._add_key(s, target_account, name, scope, tenant_id, perms, expires_at, token)
            await s.flush()
            await self.outbox.publish(
                s,
                "api_key.created",
                resource="api_key",
                resource_id=key.id,
                data={"id": key.id, "name": name, "scope": scope, "tenant": tenant},
                tenant_id=tenant_id or "",
                account_id=target_account,
            )
        await self.outbox.notify()
        return key, tenant if scope == "tenant" else "", token

    async def list_keys(self, p: Principal, limit: int, offset: int) -> tuple[list[tuple[ApiKey, str]], int]:
        async with self.db.session() as s:
            q = self._keys_visible(p)
            total = await s.scalar(select(func.count()).select_from(q.subquery())) or 0
            rows = list(await s.scalars(q.order_by(ApiKey.id).limit(page_limit(limit, 100)).offset(offset)))
            return [(k, await self._tenant_name(s, k.tenant_id)) for k in rows], total

    async def revoke_key(self, p: Principal, key_id: str) -> None:
        async with self.db.session() as s:
            key = await s.scalar(self._keys_visible(p).where(ApiKey.id == key_id))
            if key is None:
                raise not_found("api_key", key_id)
            if key.scope == "global":
                if not is_global(p):
                    raise PermissionDenied("only a global key can revoke a global key")
                # Every active global key locked, always in id order (so two revokes cannot
                # deadlock): of two concurrent revokes of the last two, the second sees the
                # first's commit and finds itself holding the last one.
                t = now()
                active = list(
                    await s.scalars(
                        select(ApiKey.id)
                        .where(
                            ApiKey.scope == "global",
                            ApiKey.revoked_at.is_(None),
                            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > t),
                        )
                        .order_by(ApiKey.id)
                        .with_for_update()
                    )
                )
                if active == [key.id]:
                    raise InvalidState(
                        "this is the last active global key; create another global key first",
                        details={"key_id": key.id},
                    )
            key = await s.scalar(
                self._keys_visible(p)
                .where(ApiKey.id == key_id)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
            if key is None:  # revoked meanwhile by a concurrent call
                raise not_found("api_key", key_id)
            key.revoked_at = now()
            await self.outbox.publish(
                s,
                "api_key.revoked",
                resource="api_key",
                resource_id=key.id,
                data={"id": key.id},
                tenant_id=key.tenant_id or "",
                account_id=key.account_id,
            )
        await self.outbox.notify()

    # -- tenants ----------------------------------------------------------------------------

    def _visible(self, p: Principal) -> Select[tuple[Tenant]]:
        q = select(Tenant)
        if is_global(p):
            return q
        if p.scope == "account":
            return q.where(Tenant.account_id == p.account_id)
        return q.where(Tenant.id == p.tenant_id)

    async def _find(self, s: AsyncSession, p: Principal, ref: str, *, lock: bool = False) -> Tenant:
        """A visible tenant by name or id; NOT_FOUND otherwise (same answer as a missing one)."""
        q = self._visible(p).where(or_(Tenant.name == ref, Tenant.id == ref))
        if lock:
            q = q.with_for_update()
        t = await s.scalar(q)
        if t is None:
            raise not_found("tenant", ref)
        return t

    async def _db_counts(self, tenants: list[Tenant]) -> dict[str, int]:
        counts = await self.peers.count([t.id for t in tenants])
        return {tid: c.get("databases", 0) for tid, c in counts.items()}

    def dsn_template(self, pg_user: str, password: str) -> str:
        return f"postgres://{pg_user}:{password}@{self.dsn_host}:{self.dsn_port}/<db-name>?sslmode=require"

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
    ) -> Created:
        if admin and not is_global(p):
            raise PermissionDenied("admin routes need a global key")
        if not admin:
            if p.scope == "tenant":
                raise PermissionDenied("a tenant-scoped key cannot create tenants")
            if not is_global(p) and not p.permissions.can_create_tenant:
                raise PermissionDenied("this key lacks can_create_tenant")
        if account_id and not is_global(p):
            raise PermissionDenied("only a global key can create a tenant in another account")
        owner = account_id or p.account_id
        password = secrets.token_urlsafe(24)
        pg_user = "tnt_" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(10))
        t = now()
        tenant = Tenant(
            id=ids.new_id("ten"),
            account_id=owner,
            name=name,
            slug=slug or slugify(name),
            plan=plan or "free",
            status="active",
            external_id=external_id,
            metadata_=metadata or {},
            quota={**DEFAULT_QUOTA, **(quota or {})},
            suspended_at=None,
            suspend_reason="",
            pg_user=pg_user,
            scram_verifier=scram_verifier(password),
            created_at=t,
            updated_at=t,
        )
        tenant.pg_password_enc = self.keyring.encrypt_str(password, aad=tenant.id)
        async with self.db.session() as s:
            # The account row lock serialises concurrent creates, so the plan cap holds.
            acct = await s.get(Account, owner, with_for_update=True)
            if acct is None:
                raise not_found("account", owner)
            plan_limits = PLANS.get(acct.plan, PLANS["standard_payg"])
            if plan_limits.max_tenants:
                n = (
                    await s.scalar(select(func.count()).select_from(Tenant).where(Tenant.account_id == owner))
                    or 0
                )
                if n >= plan_limits.max_tenants:
                    raise LimitExceeded(
                        f"the {acct.plan} plan allows {plan_limits.max_tenants} tenant(s)",
                        details={"limit": "max_tenants", "max": plan_limits.max_tenants},
                    )
            for col, value in (("name", name), ("slug", tenant.slug)):
                if await s.scalar(select(Tenant.id).where(getattr(Tenant, col) == value)):
                    raise AlreadyExists(
                        f"a tenant with {col} {value!r} already exists", details={"field": col}
                    )
            s.add(tenant)
            try:
                await s.flush()
            except IntegrityError as err:
                raise AlreadyExists("a tenant with that name or slug already exists") from err
            await self.outbox.publish(
                s,
                "tenant.created",
                resource="tenant",
                resource_id=tenant.id,
                data={"id": tenant.id, "name": name, "status": "active"},
                tenant_id=tenant.id,
                account_id=owner,
            )
        await self.outbox.notify()
        return Created(tenant, password)

    async def list_tenants(self, p: Principal, limit: int, offset: int) -> tuple[list[TenantView], int]:
        async with self.db.session() as s:
            q = self._visible(p)
            total = await s.scalar(select(func.count()).select_from(q.subquery())) or 0
            rows = list(
                await s.scalars(
                    q.order_by(Tenant.created_at, Tenant.id).limit(page_limit(limit, 100)).offset(offset)
                )
            )
        counts = await self._db_counts(rows)
        return [TenantView(t, counts.get(t.id, 0)) for t in rows], total

    async def get_tenant(self, p: Principal, ref: str) -> TenantView:
        async with self.db.session() as s:
            t = await self._find(s, p, ref)
        return TenantView(t, (await self._db_counts([t])).get(t.id, 0))

    async def credentials(self, p: Principal, ref: str) -> tuple[Tenant, str]:
        async with self.db.session() as s:
            t = await self._find(s, p, ref)
        return t, self.keyring.decrypt_str(t.pg_password_enc, aad=t.id)

    async def rotate_credentials(self, p: Principal, ref: str) -> tuple[Tenant, str]:
        # A new password cuts off every application of the tenant, so a tenant key needs the flag.
        if p.scope == "tenant" and not p.permissions.can_rotate_credentials:
            raise PermissionDenied("this key lacks can_rotate_credentials")
        password = secrets.token_urlsafe(24)
        async with self.db.session() as s:
            t = await self._find(s, p, ref, lock=True)
            t.pg_password_enc = self.keyring.encrypt_str(password, aad=t.id)
            t.scram_verifier = scram_verifier(password)
            t.updated_at = now()
            await self.outbox.publish(
                s,
                "tenant.credentials_rotated",
                resource="tenant",
                resource_id=t.id,
                data={"id": t.id, "name": t.name, "pg_user": t.pg_user},
                tenant_id=t.id,
                account_id=t.account_id,
            )
        await self.outbox.notify()
        return t, password

    async def delete_tenant(
        self, p: Principal, ref: str, cascade: bool, *, admin: bool = False
    ) -> Tenant | None:
        """None when the tenant is gone at once; the tenant in `deleting` when a cascade runs."""
        if admin and not is_global(p):
            raise PermissionDenied("admin routes need a global key")
        if not is_global(p) and not p.permissions.can_delete:
            raise PermissionDenied("this key lacks can_delete")
        async with self.db.session() as s:
            t = await self._find(s, p, ref)
        if t.status == "deleting":
            return t
        counts = (await self.peers.count([t.id])).get(t.id, {})
        owned = {
            k: v
            for k, v in counts.items()
            if v and k in ("databases", "instances", "domains", "secrets", "managed_databases")
        }
        async with self.db.session() as s:
            t = await self._find(s, p, ref, lock=True)
            if not owned:
                await s.execute(delete(Tenant).where(Tenant.id == t.id))
                await self.outbox.publish(
                    s,
                    "tenant.deleted",
                    resource="tenant",
                    resource_id=t.id,
                    data={"id": t.id, "name": t.name},
                    tenant_id=t.id,
                    account_id=t.account_id,
                )
                result = None
            elif not cascade:
                what = ", ".join(f"{v} {k}" for k, v in owned.items())
                raise InvalidState(
                    f"tenant {t.name!r} still has {what}; delete them first or pass cascade=true",
                    details=owned,
                )
            else:
                t.status, t.updated_at = "deleting", now()
                await self.outbox.publish(
                    s,
                    "tenant.deleting",
                    resource="tenant",
                    resource_id=t.id,
                    data={"id": t.id, "name": t.name, "status": "deleting"},
                    tenant_id=t.id,
                    account_id=t.account_id,
                )
                result = t
        await self.outbox.notify()
        return result

    async def reconcile_deleting(self) -> int:
        """Drive every `deleting` tenant to gone: purge in each owner, then drop the row."""
        async with self.db.session() as s:
            pending = list(await s.scalars(select(Tenant).where(Tenant.status == "deleting")))
        finished = 0
        for t in pending:
            if not await self.peers.purge(t.id):
                continue
            async with self.db.session() as s:
                await s.execute(delete(Tenant).where(Tenant.id == t.id, Tenant.status == "deleting"))
                await self.outbox.publish(
                    s,
                    "tenant.deleted",
                    resource="tenant",
                    resource_id=t.id,
                    data={"id": t.id, "name": t.name},
                    tenant_id=t.id,
                    account_id=t.account_id,
                )
            finished += 1
        if finished:
            await self.outbox.notify()
        return finished

    async def resolve(self, p: Principal, ref: str) -> TenantView:
        async with self.db.session() as s:
            return TenantView(await self._find(s, p, ref))

    async def pg_credentials(self, p: Principal, pg_user: str) -> tuple[Tenant, str]:
        if not is_system(p):
            raise PermissionDenied("internal RPC")
        async with self.db.session() as s:
            t = await s.scalar(select(Tenant).where(Tenant.pg_user == pg_user))
            if t is None:
                raise not_found("pg_user", pg_user)
        return t, self.keyring.decrypt_str(t.pg_password_enc, aad=t.id)

    async def limits(self, p: Principal, tenant_id: str) -> tuple[Tenant, Account]:
        async with self.db.session() as s:
            t = await self._find(s, p, tenant_id)
            acct = await s.get(Account, t.account_id)
            assert acct is not None
            return t, acct

    # -- Ctrl Plane admin -------------------------------------------------------------------

    def _require_global(self, p: Principal) -> None:
        if not is_global(p):
            raise PermissionDenied("admin routes need a global key")

    async def admin_list(
        self, p: Principal, status: str, cursor: str, limit: int
    ) -> tuple[list[Tenant], str, int]:
        self._require_global(p)
        q = select(Tenant)
        if status:
            q = q.where(Tenant.status == status)
        async with self.db.session() as s:
            return await keyset_page(s, q, Tenant.id, cursor, limit, 50)

    async def admin_get(self, p: Principal, tenant_id: str) -> TenantView:
        self._require_global(p)
        return await self.get_tenant(p, tenant_id)

    async def admin_update(self, p: Principal, tenant_id: str, changes: dict[str, Any]) -> TenantView:
        self._require_global(p)
        async with self.db.session() as s:
            t = await self._find(s, p, tenant_id, lock=True)
            if "name" in changes and changes["name"] != t.name:
                if await s.scalar(select(Tenant.id).where(Tenant.name == changes["name"], Tenant.id != t.id)):
                    raise AlreadyExists(
                        f"a tenant named {changes['name']!r} already exists", details={"field": "name"}
                    )
                t.name = changes["name"]
            for attr in ("plan", "external_id"):
                if attr in changes:
                    setattr(t, attr, changes[attr])
            if "metadata" in changes:
                t.metadata_ = changes["metadata"]
            t.updated_at = now()
            await self.outbox.publish(
                s,
                "tenant.updated",
                resource="tenant",
                resource_id=t.id,
                data={"id": t.id, "name": t.name, "plan": t.plan},
                tenant_id=t.id,
                account_id=t.account_id,
            )
        await self.outbox.notify()
        return await self.get_tenant(p, t.id)

    async def set_suspended(self, p: Principal, tenant_id: str, suspended: bool, reason: str) -> None:
        self._require_global(p)
        async with self.db.session() as s:
            t = await self._find(s, p, tenant_id, lock=True)
            if t.status == "deleting":
                raise InvalidState("the tenant is being deleted")
            if suspended:
                t.status, t.suspended_at, t.suspend_reason = "suspended", now(), reason
            else:
                t.status, t.suspended_at, t.suspend_reason = "active", None, ""
            t.updated_at = now()
            kind = "tenant.suspended" if suspended else "tenant.unsuspended"
            await self.outbox.publish(
                s,
                kind,
                resource="tenant",
                resource_id=t.id,
                data={"id": t.id, "name": t.name, "reason": reason},
                tenant_id=t.id,
                account_id=t.account_id,
            )
        await self.outbox.notify()

    async def get_quota(self, p: Principal, tenant_id: str) -> tuple[Tenant, dict[str, int]]:
        self._require_global(p)
        async with self.db.session() as s:
            t = await self._find(s, p, tenant_id)
        used = (await self.peers.count([t.id])).get(t.id, {})
        return t, used

    async def set_quota(self, p: Principal, tenant_id: str, quota: dict[str, int]) -> None:
        self._require_global(p)
        bad = {k: "must be >= 0" for k, v in quota.items() if v < 0}
        if bad:
            raise InvalidArgument(
                "quota values must not be negative", fields={f"quota.{k}": v for k, v in bad.items()}
            )
        async with self.db.session() as s:
            t = await self._find(s, p, tenant_id, lock=True)
            t.quota, t.updated_at = quota, now()
            await self.outbox.publish(
                s,
                "quota.updated",
                resource="quota",
                resource_id=t.id,
                data={"id": t.id, "quota": quota},
                tenant_id=t.id,
                account_id=t.account_id,
            )
        await self.outbox.notify()

    async def stats(self, p: Principal) -> dict[str, int]:
        self._require_global(p)
        async with self.db.session() as s:
            rows = (await s.execute(select(Tenant.status, func.count()).group_by(Tenant.status))).all()
            accounts = await s.scalar(select(func.count()).select_from(Account)) or 0
            keys = (
                await s.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None)))
                or 0
            )
        by_status = {status: n for status, n in rows}
        peer = await self.peers.stats()
        return {
            "total_tenants": sum(by_status.values()),
            "active_tenants": by_status.get("active", 0),
            "suspended_tenants": by_status.get("suspended", 0),
            "total_accounts": accounts,
            "total_api_keys": keys,
            "total_instances": peer.get("instances", 0),
            "running_instances": peer.get("running_instances", 0),
            "total_providers": peer.get("providers", 0),
            "healthy_providers": peer.get("healthy_providers", 0),
            "total_databases": peer.get("databases", 0),
            "running_databases": peer.get("running_databases", 0),
        }

    # -- audit ------------------------------------------------------------------------------

    async def record_audit(self, entry: dict[str, Any]) -> None:
        async with self.db.session() as s:
            s.add(AuditEntry(id=ids.new_id("aud"), created_at=now(), **entry))

    async def query_audit(
        self, p: Principal, filters: dict[str, Any], cursor: str, limit: int
    ) -> tuple[list[AuditEntry], str, int]:
        self._require_global(p)
        q = select(AuditEntry)
        for col in ("tenant_id", "resource", "action", "actor_id"):
            if filters.get(col):
                q = q.where(getattr(AuditEntry, col) == filters[col])
        if filters.get("since"):
            q = q.where(AuditEntry.created_at >= filters["since"])
        if filters.get("until"):
            q = q.where(AuditEntry.created_at <= filters["until"])
        async with self.db.session() as s:
            return await keyset_page(s, q, AuditEntry.id, cursor, limit, 50)

    # -- events -----------------------------------------------------------------------------

    def event_filter(self, p: Principal, types: list[str]):  # type: ignore[no-untyped-def]
        def where(t):  # type: ignore[no-untyped-def]
            conds = []
            if p.scope == "account":
                conds.append(t.c.account_id == p.account_id)
            elif p.scope == "tenant":
                conds.append(t.c.tenant_id == p.tenant_id)
            if types:
                conds.append(t.c.type.in_(types))
            if not conds:
                return None
            from sqlalchemy import and_

            return and_(*conds)

        return where
