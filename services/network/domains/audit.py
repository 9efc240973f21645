"""Audit entries for what the background workers change (a domain verified by the re-check, a
certificate issued, renewed or failed): the same entry the audit interceptor writes for an API
call, with this service as the actor."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("ctrlmesh.network.audit")

AuditSink = Callable[[dict[str, Any]], Awaitable[None]]


async def record(
    sink: AuditSink | None,
    *,
    tenant_id: str,
    resource: str,
    resource_id: str,
    action: str,
    outcome: str,
    reason: str = "",
    method: str,
) -> None:
    if sink is None:
        return
    entry = {
        "tenant_id": tenant_id,
        "actor_id": "system:network",
        "actor_type": "system",
        "resource": resource,
        "resource_id": resource_id,
        "action": action,
        "outcome": outcome,
        # A machine reason, as the interceptor writes (the audit log's column holds 64).
        "reason": reason[:64],
        "service": "network",
        "method": method,
        "trace_id": "",
    }
    try:
        await sink(entry)
    except Exception:
        # The change is made and its event written; a lost audit entry must not undo it.
        log.warning("could not record the audit entry of %s %s", resource, resource_id, exc_info=True)
