"""The reconciler: drives each database's actual state (its compute) toward its desired state.

Desired state is always persisted first (a create inserts `creating`; a lease sets
`target_scale=1` and `booting`; the idle stopper sets `stopping`; a delete sets `deleting`), then
the database is "kicked": one drive task per database runs the action `state.next_action` names,
and the outcome is written back with its event in one transaction. Because every step starts
from the row, a restarted service simply drives every unfinished row again (`resume`).

Single flight: the drives run on `libs.reconcile.KeyedRunner` (at most one per database in this
process), and the row lock plus conditional transitions keep concurrent callers (leases, the idle
stopper, the crash monitor, deletes) from both acting. One databases-service process runs per
data directory (the `local` driver's computes live there), so no cross-process claim is taken.
Each action is a module of `services/databases/actions/`; the periodic passes run on
`libs.reconcile.every`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from typing import Any

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession

from libs.db import Database
from libs.errors import CtrlmeshError
from libs.events import STREAM_HEAD
from libs.outbox import Outbox
from libs.reconcile import KeyedRunner, every
from libs.timeutil import now
from services.databases import events
from services.databases import repository as repo
from services.databases.actions import ACTIONS
from services.databases.actions.common import STOPPED_WRITER, spec_of
from services.databases.actions.handoff import INTERRUPTED, NO_CANDIDATE, HandoffConfig, scale_transition
from services.databases.compute.base import ComputeDriver, ComputeError, ComputeSpec
from services.databases.control import ControlBus
from services.databases.peers import Accounts
from services.databases.repository import Db
from services.databases.state import HANDOFF_ACTIVE, Action, ScaleState, State, can_transition, next_action

log = logging.getLogger("ctrlmesh.databases.lifecycle")

IDLE_STOPS = Counter("ctrlmesh_databases_idle_stops_total", "Writers stopped after the idle timeout")

# States that need a drive to finish (the reconcile pass re-kicks them).
UNFINISHED = (State.CREATING.value, State.BOOTING.value, State.STOPPING.value, State.DELETING.value)

DbKey = tuple[str, str]  # (tenant_id, db_id)


class Lifecycle:
    def __init__(
        self,
        db: Database,
        driver: ComputeDriver,
        accounts: Accounts,
        outbox: Outbox,
        *,
        idle_timeout: timedelta,
        monitor_interval: float = 0.25,
        reconcile_interval: float = 2.0,
        storage_interval: float = 60.0,
        handoff: HandoffConfig | None = None,
        bus: ControlBus | None = None,
    ):
        self.db = db
        self.driver = driver
        self.accounts = accounts
        self.outbox = outbox
        self.idle_timeout = idle_timeout
        self.monitor_interval = monitor_interval
        self.reconcile_interval = reconcile_interval
        self.storage_interval = storage_interval
        self.handoff = handoff or HandoffConfig()
        self.bus = bus or ControlBus()
        self.runner: KeyedRunner[DbKey] = KeyedRunner("database drive", self._drive)
        self._changed: dict[str, asyncio.Event] = {}
        # Fire-and-forget work, referenced so it is not garbage-collected mid-flight.
        self._side_tasks: set[asyncio.Task[None]] = set()

    # -- single-flight drives ------------------------------------------------------------------

    def kick(self, tenant_id: str, db_id: str) -> asyncio.Task[None]:
        """Make sure a drive of this database runs (again) soon; returns its task."""
        return self.runner.kick((tenant_id, db_id))

    async def run(self, tenant_id: str, db_id: str) -> None:
        """Kick and wait for the drive to settle (a create waits for its storage this way)."""
        await self.runner.run((tenant_id, db_id))

    async def _drive(self, key: DbKey) -> bool:
        """One step toward desired state. True when another step should follow at once."""
        tenant_id, db_id = key
        async with self.db.session() as s:
            db = await repo.get(s, tenant_id, db_id)
        if db is None:
            return False
        alive = None
        if db.state in (State.STOPPED, State.ERROR) or (
            db.state == State.READY and ScaleState(db.scale_state) not in HANDOFF_ACTIVE
        ):
            alive = await self.driver.is_alive(spec_of(db))
        action = next_action(db.state, db.target_scale, alive, db.scale_state)
        if action is Action.NONE:
            return False
        log.debug("database %s: %s (%s)", db.id, action, db.state)
        return await ACTIONS[action](self, db)

    def background(self, coro: Any, what: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as err:
                log.warning("%s failed: %s", what, err)
            finally:
                self._side_tasks.discard(task)

        task = asyncio.create_task(guarded())
        self._side_tasks.add(task)

    # -- waiting for a state ---------------------------------------------------------------------

    def notify(self, db_id: str) -> None:
        ev = self._changed.pop(db_id, None)
        if ev is not None:
            ev.set()

    async def wait_change(self, db_id: str, seconds: float) -> None:
        """Until this database's row may have changed here (a commit, a gateway's report), or
        `seconds` pass."""
        changed = self._changed.setdefault(db_id, asyncio.Event())
        try:
            await asyncio.wait_for(changed.wait(), seconds)
        except TimeoutError:
            pass

    async def wait_settled(self, tenant_id: str, db_id: str, deadline: float) -> Db | None:
        """The database once it is `ready`, failed (`error`), no longer wanted or gone — or as it
        is when the monotonic `deadline` passes."""
        while True:
            changed = self._changed.setdefault(db_id, asyncio.Event())
            async with self.db.session() as s:
                db = await repo.get(s, tenant_id, db_id)
            if (
                db is None
                or db.state in (State.READY, State.ERROR, State.DELETING)
                or (db.target_scale == 0 and db.state == State.STOPPED)
            ):
                return db
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return db
            try:
                # The periodic re-read covers a change made by another process.
                await asyncio.wait_for(changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass

    # -- transitions ---------------------------------------------------------------------------

    async def transition(
        self,
        s: AsyncSession,
        db: Db,
        state: State,
        values: dict[str, Any] | None = None,
        event: str | None = None,
        **extra: Any,
    ) -> Db:
        """Persist a transition (or a change within a state) and its event, in the caller's txn."""
        if state != db.state and not can_transition(db.state, state):
            raise RuntimeError(f"database {db.id}: no transition {db.state} → {state}")
        row = await repo.update_database(
            s, db.tenant_id, db.id, {"state": state.value, "updated_at": now(), **(values or {})}
        )
        assert row is not None
        if state != db.state:
            await events.publish(self.outbox, s, events.STATE_CHANGED, row, previous_state=db.state, **extra)
        if event is not None:
            await events.publish(self.outbox, s, event, row, **extra)
        return row

    async def locked(self, s: AsyncSession, db: Db, expect: State, worker_id: str | None = None) -> Db | None:
        """The row, locked, if it is still in `expect` (and still this writer): a transition
        decided from an older read must not overwrite a newer one."""
        cur = await repo.get(s, db.tenant_id, db.id, lock=True)
        if cur is None or cur.state != expect:
            return None
        if worker_id is not None and cur.worker_id != worker_id:
            return None
        return cur

    async def fail(self, db: Db, expect: State, err: BaseException, **values: Any) -> bool:
        """Record `error` with the cause if the row is still in `expect`; True when it was not
        (changed meanwhile: the caller drives again)."""
        async with self.db.session() as s:
            cur = await self.locked(s, db, expect)
            if cur is not None:
                await self.transition(s, cur, State.ERROR, {**values, "last_error": str(err)[:2000]})
        await self.committed(db.id)
        return cur is None

    async def committed(self, db_id: str) -> None:
        await self.outbox.notify()
        self.notify(db_id)

    # -- idle stop -----------------------------------------------------------------------------

    async def stop_idle(self) -> int:
        """Move every idle `ready` database to `stopping` (and kick its stop)."""
        async with self.db.session() as s:
            candidates = await repo.idle_candidates(s, now(), self.idle_timeout)
        stopped = 0
        for tenant_id, db_id in candidates:
            async with self.db.session() as s:
                cur = await repo.get(s, tenant_id, db_id, lock=True)
                # Re-checked under the row lock, which every AcquireLease takes too: a lease
                # committed before we locked is seen here; one after sees `stopping`.
                if cur is None or cur.state != State.READY:
                    continue
                if (tenant_id, db_id) not in await repo.idle_candidates(
                    s, now(), self.idle_timeout, db_id=db_id
                ):
                    continue
                await self.transition(s, cur, State.STOPPING, {"target_scale": 0}, reason="idle")
            IDLE_STOPS.inc()
            stopped += 1
            await self.committed(db_id)
            self.kick(tenant_id, db_id)
        return stopped

    # -- background loops ----------------------------------------------------------------------

    async def resume(self) -> None:
        """After a (re)start: drive every row once, so half-done creates, boots, stops and
        deletes finish, dead writers are noticed and stray ones stopped; running writers are
        adopted and get the tenant's current verifier (a rotation may have been missed)."""
        async with self.db.session() as s:
            keys = await repo.keys_in_states(s, tuple(x.value for x in State))
        for tenant_id, db_id in keys:
            self.kick(tenant_id, db_id)
        async with self.db.session() as s:
            ready = await repo.keys_in_states(s, (State.READY.value,))
        for tenant_id, db_id in ready:
            await self.resync_verifier(tenant_id, db_id)

    async def resync_verifier(self, tenant_id: str, db_id: str) -> None:
        async with self.db.session() as s:
            db = await repo.get(s, tenant_id, db_id)
        if db is None or db.state != State.READY:
            return
        try:
            verifier = await self.accounts.role_verifier(db.pg_user)
            await self.driver.set_role_verifier(spec_of(db), verifier)
        except (ComputeError, CtrlmeshError, OSError) as err:
            log.warning("could not update the role of database %s: %s", db_id, err)

    async def reconcile_loop(self) -> None:
        await self.resume()
        await every("database reconcile", self.reconcile_interval, self._kick_unfinished)

    async def _kick_unfinished(self) -> None:
        async with self.db.session() as s:
            keys = await repo.keys_in_states(s, UNFINISHED)
            keys += await repo.keys_in_handoff(s)
        for key in keys:
            if not self.runner.busy(key):
                self.runner.kick(key)

    async def monitor_loop(self) -> None:
        """Notice a writer that died while `ready` (crash, OOM kill, kill -9)."""
        await every("compute monitor", self.monitor_interval, self._check_writers, jitter=0)

    async def _check_writers(self) -> None:
        async with self.db.session() as s:
            ready = await self._ready_specs(s)
        for tenant_id, db_id, spec in ready:
            if not self.runner.busy((tenant_id, db_id)) and not await self.driver.is_alive(spec):
                self.kick(tenant_id, db_id)

    async def _ready_specs(self, s: AsyncSession) -> list[tuple[str, str, ComputeSpec]]:
        out = []
        for tenant_id, db_id in await repo.keys_in_states(s, (State.READY.value,)):
            db = await repo.get(s, tenant_id, db_id)
            if db is not None:
                out.append((tenant_id, db_id, spec_of(db)))
        return out

    async def idle_loop(self) -> None:
        interval = min(max(self.idle_timeout.total_seconds() / 4, 0.2), 5.0)
        await every("idle stop", interval, self.stop_idle, jitter=0)

    async def storage_loop(self) -> None:
        """Keep storage_bytes (billing, quota) near the truth for running databases."""
        await every("storage measurement", self.storage_interval, self._measure_storage)

    async def _measure_storage(self) -> None:
        async with self.db.session() as s:
            keys = await repo.keys_in_states(s, (State.READY.value,))
        for tenant_id, db_id in keys:
            async with self.db.session() as s:
                db = await repo.get(s, tenant_id, db_id)
            if db is None:
                continue
            size = await self.driver.storage_bytes(spec_of(db))
            async with self.db.session() as s:
                await repo.update_database(s, tenant_id, db_id, {"storage_bytes": size})

    async def credentials_loop(self) -> None:
        """Follow accounts' `tenant.credentials_rotated` events and give the running writers of
        that tenant the new verifier at once (stopped ones get it at their next boot)."""
        last: int | None = None
        while True:
            try:
                async for ev in self.accounts.watch(["tenant.credentials_rotated"], last):
                    last = int(ev.id)
                    if ev.type == STREAM_HEAD:
                        continue
                    async with self.db.session() as s:
                        ids = await repo.tenant_database_ids(s, ev.tenant_id)
                    for db_id in ids:
                        await self.resync_verifier(ev.tenant_id, db_id)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.info("accounts event stream interrupted (%s); reconnecting", err)
            await asyncio.sleep(1.0)

    async def shutdown(self) -> None:
        """A clean stop of the service: with a driver whose computes are our children, stop them
        and record `stopped` (the next lease wakes them); unfinished creates and deletes resume at
        the next start."""
        await self.runner.shutdown()
        if not self.driver.stop_on_shutdown:
            return
        async with self.db.session() as s:
            keys = await repo.keys_in_states(
                s, (State.BOOTING.value, State.READY.value, State.STOPPING.value)
            )

        async def stop_one(tenant_id: str, db_id: str) -> None:
            async with self.db.session() as s:
                db = await repo.get(s, tenant_id, db_id, lock=True)
                if db is None or db.state not in (State.BOOTING, State.READY, State.STOPPING):
                    return
                await self.driver.stop(spec_of(db))
                await repo.close_runs(s, db.id, now())
                if ScaleState(db.scale_state) in HANDOFF_ACTIVE:
                    db = await scale_transition(
                        self,
                        s,
                        db,
                        ScaleState.FAILED,
                        {
                            "freeze_new_checkouts": False,
                            "target_profile": db.current_profile,
                            "scale_failure_reason": INTERRUPTED,
                            **NO_CANDIDATE,
                        },
                        result=INTERRUPTED,
                    )
                if db.state == State.READY:
                    db = await self.transition(s, db, State.STOPPING, {"target_scale": 0}, reason="shutdown")
                await self.transition(
                    s, db, State.STOPPED, {**STOPPED_WRITER, "target_scale": 0}, reason="shutdown"
                )

        results = await asyncio.gather(*(stop_one(t, d) for t, d in keys), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.warning("could not stop a compute at shutdown: %s", r)
        await self.outbox.notify()
