"""The account itself: the platform account and its first global key, customer accounts made by
the platform, and the contact profile."""

from __future__ import annotations

from libs import ids
from libs.db import Database
from libs.errors import InvalidState, PermissionDenied, not_found
from libs.outbox import Outbox
from libs.principal import Principal, is_global
from libs.timeutil import now
from services.accounts import repository as repo
from services.accounts.crypto import new_token, token_hash
from services.accounts.keys import ALL_PERMISSIONS, add_key
from services.accounts.repository import AccountRow, KeyRow


def _new_account(email: str, name: str, company: str, plan: str, *, platform: bool) -> dict[str, object]:
    t = now()
    return {
        "id": ids.new_id("acct"),
        "email": email,
        "name": name,
        "company": company,
        "plan": plan,
        "is_platform": platform,
        "created_at": t,
        "updated_at": t,
    }


class Accounts:
    def __init__(self, db: Database, outbox: Outbox):
        self.db = db
        self.outbox = outbox

    async def bootstrap(self, admin_email: str, admin_key: str | None) -> str | None:
        """Ensure the platform account and a global key exist. Returns a newly generated token."""
        async with self.db.session() as s:
            acct = await repo.platform_account(s, lock=True)
            if acct is None:
                acct = await repo.insert_account(
                    s, _new_account(admin_email, "Platform", "", "standard_payg", platform=True)
                )
            if admin_key is not None:
                if await repo.key_by_token_hash(s, token_hash(admin_key)) is not None:
                    return None
                await add_key(s, acct.id, "bootstrap admin", "global", None, ALL_PERMISSIONS, None, admin_key)
                return None
            if await repo.active_global_keys(s):
                return None
            token = new_token()
            await add_key(s, acct.id, "bootstrap admin", "global", None, ALL_PERMISSIONS, None, token)
            return token

    async def mint_break_glass_key(self, name: str, actor: str) -> tuple[KeyRow, str]:
        """A new global key in the platform account, written straight to the database (for an
        operator who has lost every global key), audited and announced like any other key."""
        async with self.outbox.session() as s:
            acct = await repo.platform_account(s)
            if acct is None:
                raise InvalidState("the platform account does not exist yet: start the platform once first")
            token = new_token()
            key = await add_key(s, acct.id, name, "global", None, ALL_PERMISSIONS, None, token)
            await repo.insert_audit(
                s,
                {
                    "id": ids.new_id("aud"),
                    "created_at": now(),
                    "tenant_id": "",
                    "actor_id": actor,
                    "actor_type": "system",
                    "resource": "api_key",
                    "resource_id": key.id,
                    "action": "break_glass_create",
                    "outcome": "success",
                    "reason": "",
                    "service": "admin_key",
                    "method": "python -m libs.admin_key",
                    "trace_id": "",
                },
            )
            await self.outbox.publish(
                s,
                "api_key.created",
                resource="api_key",
                resource_id=key.id,
                data={"id": key.id, "name": name, "scope": "global", "tenant": ""},
                tenant_id="",
                account_id=acct.id,
            )
        return key, token

    async def get_account(self, p: Principal) -> AccountRow:
        async with self.db.session() as s:
            acct = await repo.get_account(s, p.account_id)
        if acct is None:
            raise not_found("account", p.account_id)
        return acct

    async def update_contact(self, p: Principal, email: str, name: str, company: str) -> AccountRow:
        if p.scope == "tenant":
            raise PermissionDenied("a tenant-scoped key cannot change the account profile")
        async with self.outbox.session() as s:
            # The UPDATE takes the row lock itself: no SELECT ... FOR UPDATE before it.
            acct = await repo.update_account(
                s, p.account_id, {"email": email, "name": name, "company": company, "updated_at": now()}
            )
            if acct is None:
                raise not_found("account", p.account_id)
            await self.outbox.publish(
                s,
                "account.updated",
                resource="account",
                resource_id=acct.id,
                data={"account_id": acct.id, "email": email},
                tenant_id="",  # an account-wide event: no tenant key sees it
                account_id=acct.id,
            )
        return acct

    async def create_account(
        self, p: Principal, email: str, name: str, company: str, plan: str
    ) -> tuple[AccountRow, KeyRow, str]:
        """A customer account with its owner key; the token is shown once."""
        if not is_global(p):
            raise PermissionDenied("only the platform (a global key) can create accounts")
        async with self.db.session() as s:
            acct = await repo.insert_account(s, _new_account(email, name, company, plan, platform=False))
            token = new_token()
            key = await add_key(s, acct.id, "account owner", "account", None, ALL_PERMISSIONS, None, token)
        return acct, key, token
