"""Who may see and do what in accounts: a principal's scope, and the checks every job shares."""

from __future__ import annotations

from libs.errors import PermissionDenied
from libs.principal import Principal, is_global, is_system
from services.accounts.repository import EVERYTHING, Scope


def scope_of(p: Principal) -> Scope:
    """What `p` may see: a global (or system) key everything, an account key its account, a
    tenant key its own tenant."""
    if is_global(p):
        return EVERYTHING
    if p.scope == "account":
        return Scope(account_id=p.account_id)
    return Scope(account_id=p.account_id, tenant_id=p.tenant_id)


def require_global(p: Principal) -> None:
    if not is_global(p):
        raise PermissionDenied("admin routes need a global key")


def require_system(p: Principal) -> None:
    """Internal RPCs (authentication, PG credentials, audit records) serve only other services."""
    if not is_system(p):
        raise PermissionDenied("internal RPC")
