"""Who may see and do what in accounts: a principal's scope, and the checks every job shares."""

from __future__ import annotations

from libs.errors import PermissionDenied
from libs.principal import Principal, is_global, is_system
from libs.visibility import scope_of

__all__ = ["require_global", "require_system", "scope_of"]


def require_global(p: Principal) -> None:
    if not is_global(p):
        raise PermissionDenied("admin routes need a global key")


def require_system(p: Principal) -> None:
    """Internal RPCs (authentication, PG credentials, audit records) serve only other services."""
    if not is_system(p):
        raise PermissionDenied("internal RPC")
