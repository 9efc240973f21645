"""Which tenants a principal may see: the one rule, used by accounts (its SQL scope and
ResolveTenant) and by every service deciding locally from a cached tenant (libs/peers.py).

A global key (or a service's system principal) sees every tenant; an account key the tenants of
its account; a tenant key only its own tenant (and none when it names none). A tenant outside
the scope is NOT_FOUND to the caller, exactly like a missing one.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.principal import Principal, is_global

# A tenant id no tenant has: the scope of a tenant key that names no tenant.
_NO_TENANT = "\x00"


@dataclass(frozen=True)
class Scope:
    """What a caller may see: everything (both empty), one account, or one tenant of one
    account."""

    account_id: str = ""
    tenant_id: str = ""

    def sees(self, account_id: str, tenant_id: str) -> bool:
        """Whether a tenant (`tenant_id` of account `account_id`) is inside this scope."""
        return (not self.account_id or self.account_id == account_id) and (
            not self.tenant_id or self.tenant_id == tenant_id
        )


EVERYTHING = Scope()


def scope_of(p: Principal) -> Scope:
    if is_global(p):
        return EVERYTHING
    if p.scope == "account":
        return Scope(account_id=p.account_id or _NO_TENANT)
    return Scope(account_id=p.account_id, tenant_id=p.tenant_id or _NO_TENANT)


def sees(p: Principal, account_id: str, tenant_id: str) -> bool:
    """Whether `p` may see the tenant `tenant_id` of account `account_id`."""
    return scope_of(p).sees(account_id, tenant_id)
