"""The databases service's events, written to its outbox in the transaction of the change.

Types: `database.created`, `database.state_changed` (with `previous_state`),
`database.compute_lost` (a writer died while `ready`), `database.deleted`,
`database.scale_state_changed` (a handoff phase, with `previous_scale_state`). The payload is the
database as the API shows it (snake_case, RFC 3339 timestamps), minus the tenant's name, which
accounts owns and may change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from libs.outbox import Outbox
from services.databases.repository import Db

CREATED = "database.created"
STATE_CHANGED = "database.state_changed"
COMPUTE_LOST = "database.compute_lost"
DELETED = "database.deleted"
# A handoff phase began (with `previous_scale_state`; SPG99 §6.2).
SCALE_STATE_CHANGED = "database.scale_state_changed"

_TIMESTAMPS = (
    "last_used_at",
    "autoscale_cooldown_until",
    "scale_phase_started_at",
    "scale_phase_deadline_at",
    "created_at",
    "updated_at",
)
_PUBLIC = (
    "name",
    "tenant_id",
    "size",
    "state",
    "timeline",
    "worker_id",
    "active_connections",
    "current_scale",
    "target_scale",
    "current_profile",
    "target_profile",
    "candidate_profile",
    "candidate_worker_id",
    "candidate_writer_term",
    "scale_state",
    "freeze_new_checkouts",
    "lease_control_epoch",
    "scale_failure_reason",
)


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def snapshot(db: Db) -> dict[str, Any]:
    out: dict[str, Any] = {"db_id": db.id}
    out.update({k: getattr(db, k) for k in _PUBLIC})
    out.update({k: _ts(getattr(db, k)) for k in _TIMESTAMPS})
    return out


async def publish(outbox: Outbox, s: AsyncSession, type_: str, db: Db, **extra: Any) -> None:
    await outbox.publish(
        s,
        type_,
        resource="database",
        resource_id=db.id,
        data={**snapshot(db), **extra},
        tenant_id=db.tenant_id,
        account_id=db.account_id,
    )
