"""API keys: minting, authenticating, listing and revoking, and the permission flags they carry."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from libs import ids
from libs.db import Database
from libs.errors import InvalidArgument, InvalidState, PermissionDenied, Unauthenticated, not_found
from libs.outbox import Outbox
from libs.principal import Principal, is_global
from libs.timeutil import now
from services.accounts import repository as repo
from services.accounts.access import require_system, scope_of
from services.accounts.crypto import TOKEN_PREFIX, new_token, token_hash, token_well_formed
from services.accounts.repository import AccountRow, KeyRow

# SPG99's four flags, then ctrlmesh's own (common.v1.Permissions documents each).
PERMISSIONS = ("can_create_tenant", "can_create_db", "can_scale", "can_delete", "can_rotate_credentials")
ALL_PERMISSIONS = dict.fromkeys(PERMISSIONS, True)


@dataclass(frozen=True)
class KeyView:
    """A key with the name of its tenant (empty for account and global keys)."""

    key: KeyRow
    tenant: str = ""


def permissions_of(key: KeyRow) -> dict[str, bool]:
    return {p: bool(getattr(key, p)) for p in PERMISSIONS}


def default_key_name() -> str:
    """The name of a key created without one: its UTC creation time, as neonctl names things."""
    return now().strftime("key-%Y%m%d-%H%M%S")


async def add_key(
    s: AsyncSession,
    account_id: str,
    name: str,
    scope: str,
    tenant_id: str | None,
    perms: dict[str, bool],
    expires_at: datetime | None,
    token: str,
) -> KeyRow:
    """Store a key for `token` (only its digest and a display prefix are kept)."""
    return await repo.insert_key(
        s,
        {
            "id": ids.new_id("key"),
            "account_id": account_id,
            "tenant_id": tenant_id,
            "name": name,
            "scope": scope,
            "token_hash": token_hash(token),
            "prefix": token[:10],
            "expires_at": expires_at,
            "created_at": now(),
            **{k: bool(perms.get(k)) for k in PERMISSIONS},
        },
    )


class Keys:
    def __init__(self, db: Database, outbox: Outbox):
        self.db = db
        self.outbox = outbox

    async def authenticate(self, p: Principal, token: str) -> tuple[KeyRow, AccountRow]:
        """The key and account a bearer token stands for (asked by the edge, a system caller)."""
        require_system(p)
        # Our own tokens carry a checksum: junk is refused without touching the database.
        # (A CTRLMESH_BOOTSTRAP_ADMIN_KEY may be any string, so other shapes go to the lookup.)
        if token.startswith(TOKEN_PREFIX) and not token_well_formed(token):
            raise Unauthenticated("invalid API key")
        digest = token_hash(token)
        async with self.db.session() as s:
            key = await repo.key_by_token_hash(s, digest)
            # Constant-time compare of the stored digest, though the lookup is already by hash.
            if key is None or not hmac.compare_digest(key.token_hash, digest):
                raise Unauthenticated("invalid API key")
            if key.revoked_at is not None:
                raise Unauthenticated("API key revoked")
            t = now()
            if key.expires_at is not None and key.expires_at <= t:
                raise Unauthenticated("API key expired")
            acct = await repo.get_account(s, key.account_id)
            assert acct is not None
            if key.last_used_at is None or (t - key.last_used_at).total_seconds() > 60:
                await repo.touch_key(s, key.id, t)
            return key, acct

    async def get_key(self, p: Principal, key_id: str) -> KeyView:
        scope = scope_of(p)
        async with self.db.session() as s:
            key = await repo.find_key(s, scope, key_id)
            if key is None:
                raise not_found("api_key", key_id)
            return KeyView(key, await repo.tenant_name(s, scope, key.tenant_id))

    async def create_key(
        self,
        p: Principal,
        name: str,
        scope: str,
        tenant: str,
        perms: dict[str, bool],
        expires_at: datetime | None,
        account_id: str,
    ) -> tuple[KeyView, str]:
        """A new key and its token (shown once)."""
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
        async with self.outbox.session() as s:
            if await repo.get_account(s, target_account) is None:
                raise not_found("account", target_account)
            tenant_id = None
            if scope == "tenant":
                t = await repo.find_tenant_by_name(s, scope_of(p), tenant)
                if t is None or t.account_id != target_account:
                    raise not_found("tenant", tenant)
                tenant_id = t.id
            token = new_token()
            key = await add_key(s, target_account, name, scope, tenant_id, perms, expires_at, token)
            await self.outbox.publish(
                s,
                "api_key.created",
                resource="api_key",
                resource_id=key.id,
                data={"id": key.id, "name": name, "scope": scope, "tenant": tenant},
                tenant_id=tenant_id or "",
                account_id=target_account,
            )
        return KeyView(key, tenant if scope == "tenant" else ""), token

    async def list_keys(self, p: Principal, limit: int, offset: int) -> tuple[list[KeyView], int]:
        scope = scope_of(p)
        async with self.db.session() as s:
            rows, total = await repo.list_keys(s, scope, limit, offset)
            return [KeyView(k, await repo.tenant_name(s, scope, k.tenant_id)) for k in rows], total

    async def revoke_key(self, p: Principal, key_id: str) -> None:
        scope = scope_of(p)
        async with self.outbox.session() as s:
            key = await repo.find_key(s, scope, key_id)
            if key is None:
                raise not_found("api_key", key_id)
            if key.scope == "global":
                if not is_global(p):
                    raise PermissionDenied("only a global key can revoke a global key")
                # Every live global key locked in id order: of two concurrent revokes of the
                # last two, the second sees the first's commit and finds itself holding the
                # last one.
                if await repo.lock_live_global_keys(s, now()) == [key.id]:
                    raise InvalidState(
                        "this is the last active global key; create another global key first",
                        details={"key_id": key.id},
                    )
            key = await repo.find_key(s, scope, key_id, lock=True)
            if key is None:  # revoked meanwhile by a concurrent call
                raise not_found("api_key", key_id)
            await repo.revoke_key(s, key.id, now())
            await self.outbox.publish(
                s,
                "api_key.revoked",
                resource="api_key",
                resource_id=key.id,
                data={"id": key.id},
                tenant_id=key.tenant_id or "",
                account_id=key.account_id,
            )
