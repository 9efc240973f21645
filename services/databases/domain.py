"""Databases domain logic: the /v2 database routes, the internal resolve and purge, and leases.

Plain Python over the repository; no gRPC here. A tenant is always resolved as the caller may
see it first (libs.peers.AccountsPeer: accounts' answer, cached, and the visibility rule of
libs/visibility.py), so a tenant the key may not see — and every database in it — is NOT_FOUND
exactly like a missing one.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.db import Database
from libs.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    OperationDisabled,
    PermissionDenied,
    Unavailable,
    not_found,
)
from libs.outbox import Outbox
from libs.pagination import page_limit
from libs.peers import by_id
from libs.principal import Principal, is_global, is_system
from libs.timeutil import now
from libs.visibility import scope_of
from services.databases import events
from services.databases import repository as repo
from services.databases.actions.common import spec_of
from services.databases.lifecycle import Lifecycle
from services.databases.peers import Accounts, TenantRef
from services.databases.repository import Db, LeaseRow
from services.databases.state import HANDOFF_ACTIVE, RUNNING, WAKEABLE, ScaleState, State

# Names that exist in every PostgreSQL cluster: a tenant database cannot take them.
RESERVED_NAMES = frozenset({"postgres", "template0", "template1"})
DEFAULT_LEASE_TTL = timedelta(seconds=30)


def _require_system(p: Principal) -> None:
    if not is_system(p):
        raise PermissionDenied("internal RPC")


def _writable(t: TenantRef) -> None:
    if t.status == "suspended":
        raise PermissionDenied("tenant suspended", details={"tenant": t.name})
    if t.status == "deleting":
        raise InvalidState("the tenant is being deleted", details={"tenant": t.name})


class DatabasesDomain:
    def __init__(self, db: Database, accounts: Accounts, outbox: Outbox, lifecycle: Lifecycle):
        self.db = db
        self.accounts = accounts
        self.outbox = outbox
        self.lifecycle = lifecycle

    # -- public routes -------------------------------------------------------------------------

    async def create(
        self, p: Principal, tenant: str, name: str, size: str, *, start_immediately: bool, initial_scale: int
    ) -> tuple[Db, TenantRef]:
        if start_immediately or initial_scale != 0:
            raise OperationDisabled(
                "databases start on their first connection: start_immediately and initial_scale are disabled",
                details={"field": "start_immediately" if start_immediately else "initial_scale"},
            )
        if not is_global(p) and not p.permissions.can_create_db:
            raise PermissionDenied("this key lacks can_create_db")
        if name in RESERVED_NAMES:
            raise InvalidArgument(f"{name!r} is reserved", fields={"name": "reserved by PostgreSQL"})
        t = await self.accounts.tenant_ref(p, tenant)
        _writable(t)
        limits = await self.accounts.limits(t.id)
        if limits.sizes and size not in limits.sizes:
            raise LimitExceeded(
                f"the {limits.plan} plan allows sizes {', '.join(limits.sizes)}",
                details={"limit": "sizes", "allowed": ",".join(limits.sizes)},
            )
        ts = now()
        db_id = str(uuid.uuid4())
        try:
            async with self.outbox.session() as s:
                await repo.lock_account(s, t.account_id)
                if limits.max_databases:
                    n = await repo.count_account_databases(s, t.account_id)
                    if n >= limits.max_databases:
                        raise LimitExceeded(
                            f"the {limits.plan} plan allows {limits.max_databases} database(s)",
                            details={"limit": "max_databases", "max": limits.max_databases},
                        )
                if await repo.get_by_name(s, t.id, name) is not None:
                    raise AlreadyExists(
                        f"a database named {name!r} already exists", details={"field": "name"}
                    )
                await repo.insert_database(
                    s,
                    {
                        "id": db_id,
                        "tenant_id": t.id,
                        "account_id": t.account_id,
                        "pg_user": t.pg_user,
                        "name": name,
                        "size": size,
                        "state": State.CREATING.value,
                        # The durable history id exists from the start (SPG99 §5.2.1).
                        "timeline": uuid.uuid4().hex,
                        "current_profile": size,
                        "target_profile": size,
                        "created_at": ts,
                        "updated_at": ts,
                    },
                )
                row = await repo.get(s, t.id, db_id)
                assert row is not None
                await events.publish(self.outbox, s, events.CREATED, row)
        except IntegrityError as err:
            raise AlreadyExists(
                f"a database named {name!r} already exists", details={"field": "name"}
            ) from err
        # The storage (initdb, the role, the database) is made now, never on the wake path.
        await self.lifecycle.run(t.id, db_id)
        async with self.db.session() as s:
            row = await repo.get(s, t.id, db_id)
        if row is None:
            raise not_found("database", name)
        if row.state == State.ERROR:
            await self._mark_deleting(t.id, db_id)
            raise Unavailable("could not prepare the database's storage; retry", details={"database": name})
        return row, t

    async def list(
        self, p: Principal, tenant: str, *, state: str, name_prefix: str, limit: int, offset: int
    ) -> tuple[list[Db], int, TenantRef]:
        t = await self.accounts.tenant_ref(p, tenant, cached=True)
        rows, total = await self.db.read(
            lambda s: repo.list_databases(
                s, t.id, state=state, name_prefix=name_prefix, limit=page_limit(limit, 100), offset=offset
            )
        )
        return rows, total, t

    async def get(self, p: Principal, tenant: str, name: str) -> tuple[Db, TenantRef]:
        t = await self.accounts.tenant_ref(p, tenant, cached=True)
        row = await self.db.read(lambda s: repo.get_by_name(s, t.id, name))
        if row is None:
            raise not_found("database", name)
        return row, t

    async def get_by_id(self, p: Principal, db_id: str) -> tuple[Db, TenantRef]:
        scope = scope_of(p)
        return await by_id(
            lambda: self.db.read(lambda s: repo.get_by_id(s, scope, db_id)),
            lambda row: row.tenant_id,
            lambda tenant_id: self.accounts.tenant_ref(p, tenant_id, cached=True),
            kind="database",
            ident=db_id,
        )

    async def delete(self, p: Principal, tenant: str, name: str, *, force: bool) -> tuple[Db, TenantRef]:
        if not is_global(p) and not p.permissions.can_delete:
            raise PermissionDenied("this key lacks can_delete")
        t = await self.accounts.tenant_ref(p, tenant)
        _writable(t)
        async with self.db.session() as s:
            row = await repo.get_by_name(s, t.id, name, lock=True)
            if row is None:
                raise not_found("database", name)
            if row.state == State.DELETING:
                return row, t
            if row.state in RUNNING and not force:
                raise InvalidState(
                    f"database {name!r} is running ({row.state}); pass force=true to delete it anyway",
                    details={"state": row.state},
                )
            row = await self.lifecycle.transition(s, row, State.DELETING, {"target_scale": 0})
        await self.lifecycle.committed(row.id)
        self.lifecycle.kick(t.id, row.id)
        return row, t

    def manual_lifecycle(self, action: str) -> None:
        raise OperationDisabled(
            f"manual {action} is disabled: databases start on their first connection, stop when idle, "
            "and the autoscaler owns the profile",
            details={"action": action},
        )

    # -- internal ------------------------------------------------------------------------------

    async def resolve(self, p: Principal, tenant_id: str, name: str) -> Db:
        _require_system(p)
        row = await self.db.read(lambda s: repo.get_by_name(s, tenant_id, name))
        if row is None or row.state == State.DELETING:
            raise not_found("database", name)
        return row

    async def _mark_deleting(self, tenant_id: str, db_id: str) -> None:
        async with self.db.session() as s:
            row = await repo.get(s, tenant_id, db_id, lock=True)
            if row is None or row.state == State.DELETING:
                return
            await self.lifecycle.transition(s, row, State.DELETING, {"target_scale": 0})
        await self.lifecycle.committed(db_id)
        self.lifecycle.kick(tenant_id, db_id)

    async def purge_tenant(self, tenant_id: str) -> bool:
        """A tenant cascade delete: every database goes `deleting` (compute stopped, storage
        destroyed, row removed by the reconciler). True once none is left."""
        async with self.db.session() as s:
            ids = await repo.tenant_database_ids(s, tenant_id)
        for db_id in ids:
            await self._mark_deleting(tenant_id, db_id)
        async with self.db.session() as s:
            return not await repo.tenant_database_ids(s, tenant_id)


class LeaseDomain:
    """The Gateway's leases. A lease is the holder's row for (database, holder), live while
    unexpired and of the database's current epoch; the epoch (lease_control_epoch) moves on to a
    new writer generation, so a lease of a lost writer is refused at renew and re-acquired."""

    def __init__(self, db: Database, accounts: Accounts, lifecycle: Lifecycle):
        self.db = db
        self.accounts = accounts
        self.lifecycle = lifecycle

    async def acquire(
        self,
        p: Principal,
        tenant_id: str,
        name: str,
        holder_id: str,
        ttl: timedelta | None,
        *,
        wait_until: float | None,
    ) -> tuple[LeaseRow, Db]:
        _require_system(p)
        limits = await self.accounts.limits(tenant_id)
        if limits.status == "suspended":
            raise PermissionDenied("tenant suspended")
        if limits.status == "deleting":
            raise not_found("database", name)
        ttl = ttl or DEFAULT_LEASE_TTL
        async with self.db.session() as s:
            peek = await repo.get_by_name(s, tenant_id, name)
        if (
            peek is not None
            and peek.state == State.READY
            and ScaleState(peek.scale_state) not in HANDOFF_ACTIVE  # a handoff stops it on purpose
            and not await self.lifecycle.driver.is_alive(spec_of(peek))
        ):
            # A writer that died a moment ago: record it now rather than route to a dead port.
            await self.lifecycle.run(tenant_id, peek.id)
        wake = False
        async with self.db.session() as s:
            # The row lock orders this lease against the idle stopper and every other acquire:
            # exactly one caller sees no writer wanted and asks for one.
            row = await repo.get_by_name(s, tenant_id, name, lock=True)
            if row is None or row.state == State.DELETING:
                raise not_found("database", name)
            if row.state == State.CREATING:
                raise Unavailable("the database is being created; retry", details={"database": name})
            t = now()
            values: dict[str, Any] = {"last_used_at": t, "updated_at": t}
            if row.target_scale == 0 and row.state in (*WAKEABLE, State.STOPPING):
                # Desired state first: a writer is wanted, of a new generation.
                wake = True
                values.update(target_scale=1, lease_control_epoch=row.lease_control_epoch + 1)
            if wake and row.state in WAKEABLE:
                row = await self.lifecycle.transition(s, row, State.BOOTING, values, reason="lease")
            else:
                updated = await repo.update_database(s, tenant_id, row.id, values)
                assert updated is not None
                row = updated
            lease = await repo.upsert_lease(
                s, lease_id=str(uuid.uuid4()), db=row, holder_id=holder_id, ttl=ttl, now=t
            )
        await self.lifecycle.committed(row.id)
        if wake:
            self.lifecycle.kick(tenant_id, row.id)
        if wait_until is not None and row.state != State.READY:
            settled = await self.lifecycle.wait_settled(tenant_id, row.id, wait_until)
            if settled is None or settled.state == State.DELETING:
                raise not_found("database", name)
            if settled.state == State.ERROR:
                raise Unavailable("the database's compute failed to start; retry", details={"database": name})
            row = settled
        return lease, row

    async def _locked_pair(self, s: AsyncSession, lease_id: str) -> tuple[LeaseRow | None, Db | None]:
        """The lease and its database, locked database first (AcquireLease's order: no deadlock)."""
        peek = await repo.get_lease(s, lease_id)
        if peek is None:
            return None, None
        db = await repo.get(s, peek.tenant_id, peek.db_id, lock=True)
        return await repo.get_lease(s, lease_id, lock=True), db

    async def renew(
        self,
        p: Principal,
        lease_id: str,
        epoch: int,
        ttl: timedelta | None,
        active: int,
        report: repo.DrainReport | None = None,
    ) -> tuple[LeaseRow, Db]:
        _require_system(p)
        async with self.db.session() as s:
            lease, db = await self._locked_pair(s, lease_id)
            t = now()
            if lease is None or lease.expires_at <= t:
                raise not_found("lease", lease_id)
            if db is None or db.state == State.DELETING:
                raise not_found("database", lease.db_id)
            if lease.epoch != epoch or lease.epoch != db.lease_control_epoch:
                raise InvalidState(
                    "the lease's epoch is stale: the writer changed; acquire a new lease",
                    details={"epoch": db.lease_control_epoch},
                )
            ttl = ttl or timedelta(seconds=lease.ttl_seconds)
            await repo.renew_lease(s, lease_id, ttl=ttl, active=active, now=t, report=report)
            values: dict[str, Any] = {"active_connections": await repo.active_connections(s, db, t)}
            if active > 0:
                values["last_used_at"] = t
            updated = await repo.update_database(s, db.tenant_id, db.id, values)
            renewed = await repo.get_lease(s, lease_id)
        assert updated is not None and renewed is not None
        if updated.freeze_new_checkouts:
            self.lifecycle.notify(updated.id)  # a draining handoff looks at the reports at once
        return renewed, updated

    async def release(self, p: Principal, lease_id: str, epoch: int) -> None:
        _require_system(p)
        async with self.db.session() as s:
            lease, db = await self._locked_pair(s, lease_id)
            if lease is None:
                return  # released already, or gone with its database
            if lease.epoch != epoch:
                # The holder re-acquired at a newer epoch since: this release is not for that one.
                raise InvalidState("the lease's epoch is stale", details={"epoch": lease.epoch})
            await repo.delete_lease(s, lease_id)
            if db is not None:
                t = now()
                await repo.update_database(
                    s,
                    db.tenant_id,
                    db.id,
                    {
                        "active_connections": await repo.active_connections(s, db, t),
                        "last_used_at": t,
                    },
                )


def deadline_after(seconds: float | None, default: float = 30.0, margin: float = 0.05) -> float:
    """A monotonic deadline shortly before the caller's, so the answer arrives in time."""
    budget = default if seconds is None else seconds
    return time.monotonic() + max(0.0, budget - margin)
