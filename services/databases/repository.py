"""SQL for the databases service (SQLAlchemy Core over one AsyncSession per unit of work).

Every function that reads a database's data takes its tenant: callers resolve the tenant (and
its visibility) first, so a row of another tenant is simply not found. The few system scans the
reconciler needs return only (tenant_id, db_id) keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Integer, and_, delete, exists, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession

from libs.db import xact_lock
from libs.visibility import Scope
from services.databases.models import compute_runs, databases, leases
from services.databases.state import HANDOFF_ACTIVE

HANDOFF_PHASES = tuple(sorted(p.value for p in HANDOFF_ACTIVE))


@dataclass(frozen=True)
class Db:
    """One `databases` row."""

    id: str
    tenant_id: str
    name: str
    size: str
    state: str
    timeline: str
    worker_id: str
    active_connections: int
    last_used_at: datetime | None
    current_scale: int
    target_scale: int
    current_profile: str
    target_profile: str
    candidate_profile: str | None
    candidate_worker_id: str | None
    candidate_writer_term: int | None
    scale_state: str
    freeze_new_checkouts: bool
    lease_control_epoch: int
    autoscale_cooldown_until: datetime | None
    scale_phase_started_at: datetime | None
    scale_phase_deadline_at: datetime | None
    scale_failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    account_id: str
    pg_user: str
    writer_host: str
    writer_port: int
    storage_bytes: int
    last_error: str


_DB_FIELDS = tuple(f.name for f in fields(Db))


def _db(row: Any) -> Db | None:
    return None if row is None else Db(**{k: row[k] for k in _DB_FIELDS})


@dataclass(frozen=True)
class LeaseRow:
    id: str
    db_id: str
    tenant_id: str
    holder_id: str
    epoch: int
    ttl_seconds: int
    active_connections: int
    created_at: datetime
    renewed_at: datetime
    expires_at: datetime


_LEASE_FIELDS = tuple(f.name for f in fields(LeaseRow))


def _lease(row: Any) -> LeaseRow | None:
    return None if row is None else LeaseRow(**{k: row[k] for k in _LEASE_FIELDS})


# -- catalog -----------------------------------------------------------------------------------


async def insert_database(s: AsyncSession, values: dict[str, Any]) -> None:
    """Raises IntegrityError when the tenant already has a database with that name."""
    await s.execute(insert(databases).values(**values))


async def get(s: AsyncSession, tenant_id: str, db_id: str, *, lock: bool = False) -> Db | None:
    q = select(databases).where(databases.c.tenant_id == tenant_id, databases.c.id == db_id)
    if lock:
        q = q.with_for_update()
    return _db((await s.execute(q)).mappings().first())


async def get_by_name(s: AsyncSession, tenant_id: str, name: str, *, lock: bool = False) -> Db | None:
    q = select(databases).where(databases.c.tenant_id == tenant_id, databases.c.name == name)
    if lock:
        q = q.with_for_update()
    return _db((await s.execute(q)).mappings().first())


async def get_by_id(s: AsyncSession, scope: Scope, db_id: str) -> Db | None:
    """A database by bare id within what the caller may see (libs/visibility.py: its account,
    its tenant or everything): the one statement of GET /v2/dbs/{id}."""
    q = select(databases).where(databases.c.id == db_id)
    if scope.account_id:
        q = q.where(databases.c.account_id == scope.account_id)
    if scope.tenant_id:
        q = q.where(databases.c.tenant_id == scope.tenant_id)
    return _db((await s.execute(q)).mappings().first())


async def owner_of(s: AsyncSession, db_id: str) -> str | None:
    """The tenant id of a database (the key to resolve visibility with), None when missing."""
    return await s.scalar(select(databases.c.tenant_id).where(databases.c.id == db_id))


async def list_databases(
    s: AsyncSession, tenant_id: str, *, state: str, name_prefix: str, limit: int, offset: int
) -> tuple[list[Db], int]:
    q = select(databases).where(databases.c.tenant_id == tenant_id)
    if state:
        q = q.where(databases.c.state == state)
    if name_prefix:
        # startswith() escapes LIKE wildcards: `_` is common in database names.
        q = q.where(databases.c.name.startswith(name_prefix, autoescape=True))
    total = await s.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = (await s.execute(q.order_by(databases.c.name).limit(limit).offset(offset))).mappings().all()
    return [d for d in map(_db, rows) if d is not None], int(total)


async def lock_account(s: AsyncSession, account_id: str) -> None:
    """Serialise creates within one account until the transaction ends, so the plan's database
    cap holds under concurrent creates (the rows to count may not exist yet: no row to lock)."""
    await xact_lock(s, "dbs", account_id)


async def count_account_databases(s: AsyncSession, account_id: str) -> int:
    q = (
        select(func.count())
        .select_from(databases)
        .where(databases.c.account_id == account_id, databases.c.state != "deleting")
    )
    return int(await s.scalar(q) or 0)


async def update_database(s: AsyncSession, tenant_id: str, db_id: str, values: dict[str, Any]) -> Db | None:
    q = (
        update(databases)
        .where(databases.c.tenant_id == tenant_id, databases.c.id == db_id)
        .values(**values)
        .returning(databases)
    )
    return _db((await s.execute(q)).mappings().first())


async def delete_database(s: AsyncSession, tenant_id: str, db_id: str) -> bool:
    res = await s.execute(
        delete(databases).where(databases.c.tenant_id == tenant_id, databases.c.id == db_id)
    )
    return bool(cast(CursorResult[Any], res).rowcount)


async def tenant_database_ids(s: AsyncSession, tenant_id: str) -> list[str]:
    return list(await s.scalars(select(databases.c.id).where(databases.c.tenant_id == tenant_id)))


# -- system scans for the reconciler -----------------------------------------------------------


async def keys_in_handoff(s: AsyncSession, phases: tuple[str, ...] = HANDOFF_PHASES) -> list[tuple[str, str]]:
    """(tenant_id, db_id) of every `ready` database in one of these handoff phases."""
    rows = await s.execute(
        select(databases.c.tenant_id, databases.c.id).where(
            databases.c.state == "ready", databases.c.scale_state.in_(phases)
        )
    )
    return [(t, i) for t, i in rows.all()]


async def keys_in_states(s: AsyncSession, states: tuple[str, ...]) -> list[tuple[str, str]]:
    """(tenant_id, db_id) of every database in one of these states."""
    rows = await s.execute(select(databases.c.tenant_id, databases.c.id).where(databases.c.state.in_(states)))
    return [(t, i) for t, i in rows.all()]


def _live(now: datetime) -> Any:
    """A lease that protects its database: unexpired and of the current writer generation."""
    return and_(
        leases.c.db_id == databases.c.id,
        leases.c.epoch == databases.c.lease_control_epoch,
        leases.c.expires_at > now,
    )


async def idle_candidates(
    s: AsyncSession, now: datetime, idle: timedelta, *, db_id: str | None = None
) -> list[tuple[str, str]]:
    """`ready` databases (or just this one) with no live lease whose last use (the last acquire,
    renew or release, or the expiry of a lease that was never released) is older than `idle`."""
    last_expiry = (
        select(func.max(leases.c.expires_at)).where(leases.c.db_id == databases.c.id).scalar_subquery()
    )
    idle_since = func.greatest(
        func.coalesce(databases.c.last_used_at, databases.c.updated_at), databases.c.updated_at, last_expiry
    )
    q = select(databases.c.tenant_id, databases.c.id).where(
        databases.c.state == "ready",
        # A handoff in flight owns the writer; the database is idle-stopped after it.
        databases.c.scale_state.notin_(HANDOFF_PHASES),
        ~exists().where(_live(now)),
        idle_since < now - idle,
    )
    if db_id is not None:
        q = q.where(databases.c.id == db_id)
    return [(t, i) for t, i in (await s.execute(q)).all()]


async def has_live_lease(s: AsyncSession, db: Db, now: datetime) -> bool:
    q = select(
        exists().where(
            leases.c.db_id == db.id, leases.c.epoch == db.lease_control_epoch, leases.c.expires_at > now
        )
    )
    return bool(await s.scalar(q))


# -- leases --------------------------------------------------------------------------------------


async def upsert_lease(
    s: AsyncSession, *, lease_id: str, db: Db, holder_id: str, ttl: timedelta, now: datetime
) -> LeaseRow:
    """The holder's lease on the database, created or taken over at the database's epoch."""
    values = {
        "id": lease_id,
        "db_id": db.id,
        "tenant_id": db.tenant_id,
        "holder_id": holder_id,
        "epoch": db.lease_control_epoch,
        "ttl_seconds": int(ttl.total_seconds()),
        "active_connections": 0,
        "created_at": now,
        "renewed_at": now,
        "expires_at": now + ttl,
    }
    stmt = pg_insert(leases).values(**values)
    upsert = stmt.on_conflict_do_update(
        constraint="uq_leases_db_holder",
        set_={
            "epoch": stmt.excluded.epoch,
            "ttl_seconds": stmt.excluded.ttl_seconds,
            "renewed_at": stmt.excluded.renewed_at,
            "expires_at": stmt.excluded.expires_at,
        },
    ).returning(leases)
    row = _lease((await s.execute(upsert)).mappings().first())
    assert row is not None
    return row


async def get_lease(s: AsyncSession, lease_id: str, *, lock: bool = False) -> LeaseRow | None:
    q = select(leases).where(leases.c.id == lease_id)
    if lock:
        q = q.with_for_update()
    return _lease((await s.execute(q)).mappings().first())


@dataclass(frozen=True)
class DrainReport:
    """What the gateways holding live leases on a database last reported (handoff)."""

    holders: int = 0
    frozen: int = 0
    busy: int = 0
    pinned: int = 0
    waits: int = 0


async def renew_lease(
    s: AsyncSession,
    lease_id: str,
    *,
    ttl: timedelta,
    active: int,
    now: datetime,
    report: DrainReport | None = None,
) -> None:
    values: dict[str, Any] = {
        "ttl_seconds": int(ttl.total_seconds()),
        "active_connections": active,
        "renewed_at": now,
        "expires_at": now + ttl,
    }
    if report is not None:
        values.update(
            frozen=bool(report.frozen),
            busy_backends=report.busy,
            pinned_sessions=report.pinned,
            checkout_waits=report.waits,
        )
    await s.execute(update(leases).where(leases.c.id == lease_id).values(**values))


async def reset_drain_reports(s: AsyncSession, db_id: str) -> None:
    """At a freeze: no holder counts as frozen until it reports so afterwards."""
    await s.execute(update(leases).where(leases.c.db_id == db_id).values(frozen=False))


async def drain_report(s: AsyncSession, db: Db, now: datetime) -> DrainReport:
    """The sum over the live leases of the current generation."""
    q = select(
        func.count(),
        func.coalesce(func.sum(func.cast(leases.c.frozen, Integer)), 0),
        func.coalesce(func.sum(leases.c.busy_backends), 0),
        func.coalesce(func.sum(leases.c.pinned_sessions), 0),
        func.coalesce(func.sum(leases.c.checkout_waits), 0),
    ).where(leases.c.db_id == db.id, leases.c.epoch == db.lease_control_epoch, leases.c.expires_at > now)
    row = (await s.execute(q)).one()
    return DrainReport(*(int(x) for x in row))


async def delete_lease(s: AsyncSession, lease_id: str) -> None:
    await s.execute(delete(leases).where(leases.c.id == lease_id))


async def delete_expired_leases(s: AsyncSession, db_id: str, now: datetime) -> None:
    """Drop leases that ended (their expiry only mattered for the idle clock of a running writer)."""
    await s.execute(delete(leases).where(leases.c.db_id == db_id, leases.c.expires_at <= now))


async def active_connections(s: AsyncSession, db: Db, now: datetime) -> int:
    """Client connections reported by the live leases of the current generation."""
    q = select(func.coalesce(func.sum(leases.c.active_connections), 0)).where(
        leases.c.db_id == db.id, leases.c.epoch == db.lease_control_epoch, leases.c.expires_at > now
    )
    return int(await s.scalar(q) or 0)


# -- compute run intervals (CU·h) ------------------------------------------------------------


async def open_run(
    s: AsyncSession, db: Db, *, worker_id: str, profile: str, cu: int, started_at: datetime
) -> None:
    """Open the writer's run interval (at most one open per database: a unique partial index)."""
    stmt = pg_insert(compute_runs).values(
        db_id=db.id,
        tenant_id=db.tenant_id,
        worker_id=worker_id,
        profile=profile,
        cu=cu,
        started_at=started_at,
    )
    await s.execute(stmt.on_conflict_do_nothing())


async def close_runs(s: AsyncSession, db_id: str, at: datetime) -> None:
    await s.execute(
        update(compute_runs)
        .where(compute_runs.c.db_id == db_id, compute_runs.c.ended_at.is_(None))
        .values(ended_at=func.greatest(at, compute_runs.c.started_at))
    )
