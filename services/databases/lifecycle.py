"""The reconciler: drives each database's actual state (its compute) toward its desired state.

Desired state is always persisted first (a create inserts `creating`; a lease sets
`target_scale=1` and `booting`; the idle stopper sets `stopping`; a delete sets `deleting`), then
the database is "kicked": one drive task per database runs the action `state.next_action` names,
and the outcome is written back with its event in one transaction. Because every step starts
from the row, a restarted service simply drives every unfinished row again (`resume`).

Single flight: at most one drive task per database in this process, and the row lock plus
conditional transitions keep concurrent callers (leases, the idle stopper, the crash monitor,
deletes) from both acting. One databases-service process runs per data directory (the `local`
driver's computes live there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncSession

from libs.db import Database
from libs.errors import CtrlmeshError
from libs.outbox import Outbox
from services.databases import events
from services.databases import repository as repo
from services.databases.compute.base import ComputeDriver, ComputeError, ComputeSpec
from services.databases.compute.profiles import profile
from services.databases.peers import Accounts
from services.databases.repository import Db
from services.databases.state import Action, State, can_transition, next_action

log = logging.getLogger("ctrlmesh.databases.lifecycle")

COLD_STARTS = Counter("ctrlmesh_databases_cold_starts_total", "Writers started", ["outcome"])
BOOT_SECONDS = Histogram(
    "ctrlmesh_databases_boot_seconds",
    "booting → ready, control plane included",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
COMPUTES_LOST = Counter("ctrlmesh_databases_computes_lost_total", "Writers that died while ready")
IDLE_STOPS = Counter("ctrlmesh_databases_idle_stops_total", "Writers stopped after the idle timeout")

# States that need a drive to finish (the reconcile pass re-kicks them).
UNFINISHED = (State.CREATING.value, State.BOOTING.value, State.STOPPING.value, State.DELETING.value)


def now() -> datetime:
    return datetime.now(UTC)


def spec_of(db: Db) -> ComputeSpec:
    return ComputeSpec(
        db_id=db.id,
        tenant_id=db.tenant_id,
        db_name=db.name,
        role=db.pg_user,
        generation=db.lease_control_epoch,
    )


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
    ):
        self.db = db
        self.driver = driver
        self.accounts = accounts
        self.outbox = outbox
        self.idle_timeout = idle_timeout
        self.monitor_interval = monitor_interval
        self.reconcile_interval = reconcile_interval
        self.storage_interval = storage_interval
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._changed: dict[str, asyncio.Event] = {}
        # Fire-and-forget work, referenced so it is not garbage-collected mid-flight.
        self._side_tasks: set[asyncio.Task[None]] = set()

    # -- single-flight drives ------------------------------------------------------------------

    def kick(self, tenant_id: str, db_id: str) -> asyncio.Task[None]:
        """Make sure a drive of this database runs (again) soon; returns its task."""
        task = self._tasks.get(db_id)
        if task is not None and not task.done():
            self._again.add(db_id)
            return task
        task = asyncio.create_task(self._drive_loop(tenant_id, db_id), name=f"drive-{db_id}")
        self._tasks[db_id] = task
        return task

    async def run(self, tenant_id: str, db_id: str) -> None:
        """Kick and wait for the drive to settle (a create waits for its storage this way)."""
        await asyncio.shield(self.kick(tenant_id, db_id))

    async def _drive_loop(self, tenant_id: str, db_id: str) -> None:
        try:
            while True:
                self._again.discard(db_id)
                try:
                    again = await self._drive(tenant_id, db_id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The row still says what is wanted: the reconcile pass retries it.
                    log.exception("drive of database %s failed; will retry", db_id)
                    again = False
                if not again and db_id not in self._again:
                    return
        finally:
            if self._tasks.get(db_id) is asyncio.current_task():
                del self._tasks[db_id]

    async def _drive(self, tenant_id: str, db_id: str) -> bool:
        """One step toward desired state. True when another step should follow at once."""
        async with self.db.session() as s:
            db = await repo.get(s, tenant_id, db_id)
        if db is None:
            return False
        alive = None
        if db.state in (State.READY, State.STOPPED, State.ERROR):
            alive = await self.driver.is_alive(spec_of(db))
        action = next_action(db.state, db.target_scale, alive)
        if action is Action.NONE:
            return False
        log.debug("database %s: %s (%s)", db.id, action, db.state)
        handler = {
            Action.PREPARE: self._prepare,
            Action.BOOT: self._boot,
            Action.STOP: self._stop,
            Action.DELETE: self._delete,
            Action.LOST: self._lost,
            Action.REAP: self._reap,
        }[action]
        return await handler(db)

    def _background(self, coro: Any, what: str) -> None:
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

    async def _locked(
        self, s: AsyncSession, db: Db, expect: State, worker_id: str | None = None
    ) -> Db | None:
        """The row, locked, if it is still in `expect` (and still this writer): a transition
        decided from an older read must not overwrite a newer one."""
        cur = await repo.get(s, db.tenant_id, db.id, lock=True)
        if cur is None or cur.state != expect:
            return None
        if worker_id is not None and cur.worker_id != worker_id:
            return None
        return cur

    async def committed(self, db_id: str) -> None:
        await self.outbox.notify()
        self.notify(db_id)

    # -- actions ---------------------------------------------------------------------------------

    async def _prepare(self, db: Db) -> bool:
        spec = spec_of(db)
        try:
            verifier = await self.accounts.role_verifier(db.pg_user)
            await self.driver.prepare(spec, verifier)
            size = await self.driver.storage_bytes(spec)
        except Exception as err:  # whatever failed, the storage is not usable: `error`
            log.error("could not prepare database %s: %s", db.id, err)
            async with self.db.session() as s:
                cur = await self._locked(s, db, State.CREATING)
                if cur is not None:
                    await self.transition(s, cur, State.ERROR, {"last_error": str(err)[:2000]})
            await self.committed(db.id)
            return False
        async with self.db.session() as s:
            cur = await self._locked(s, db, State.CREATING)
            if cur is not None:
                await self.transition(s, cur, State.STOPPED, {"storage_bytes": size, "last_error": ""})
        await self.committed(db.id)
        return cur is None  # deleted meanwhile: drive again

    async def _boot(self, db: Db) -> bool:
        if db.state == State.STOPPED:  # wanted but not marked booting (only after manual repair)
            async with self.db.session() as s:
                cur = await self._locked(s, db, State.STOPPED)
                if cur is None or cur.target_scale != 1:
                    return True
                db = await self.transition(s, cur, State.BOOTING)
            await self.committed(db.id)
        spec = spec_of(db)
        prof = profile(db.target_profile)
        t0, started_at = time.monotonic(), now()
        try:
            # The verifier lookup runs while the server starts: the wake path pays for one.
            endpoint, verifier = await asyncio.gather(
                self.driver.start(spec, prof), self.accounts.role_verifier(db.pg_user)
            )
            if await self.driver.role_verifier_applied(spec, verifier):
                # Unchanged since it was last set: route at once, and set it again behind (it
                # undoes a password the tenant may have changed from inside its own session).
                self._background(self.driver.set_role_verifier(spec, verifier), f"verifier of {db.id}")
            else:
                await self.driver.set_role_verifier(spec, verifier)
        except Exception as err:  # whatever failed (driver, accounts, the admin login): not ready
            COLD_STARTS.labels("error").inc()
            log.error("could not start database %s: %s", db.id, err)
            try:
                await self.driver.stop(spec)
            except ComputeError:
                log.warning("could not stop the failed compute of %s", db.id, exc_info=True)
            async with self.db.session() as s:
                cur = await self._locked(s, db, State.BOOTING)
                if cur is not None:
                    await self.transition(
                        s,
                        cur,
                        State.ERROR,
                        {"target_scale": 0, "current_scale": 0, "last_error": str(err)[:2000]},
                    )
            await self.committed(db.id)
            return cur is None
        async with self.db.session() as s:
            cur = await self._locked(s, db, State.BOOTING)
            if cur is not None:
                await self.transition(
                    s,
                    cur,
                    State.READY,
                    {
                        "current_scale": 1,
                        "current_profile": prof.name,
                        "worker_id": endpoint.worker_id,
                        "writer_host": endpoint.host,
                        "writer_port": endpoint.port,
                        "last_error": "",
                    },
                )
                await repo.open_run(
                    s, cur, worker_id=endpoint.worker_id, profile=prof.name, cu=prof.cu, started_at=started_at
                )
        await self.committed(db.id)
        if cur is None:
            return True  # deleted or otherwise changed while booting: the next step handles it
        COLD_STARTS.labels("ok").inc()
        BOOT_SECONDS.observe(time.monotonic() - t0)
        log.info(
            "database %s ready on %s:%d in %.0f ms",
            db.id,
            endpoint.host,
            endpoint.port,
            1000 * (time.monotonic() - t0),
        )
        return False

    async def _stop(self, db: Db) -> bool:
        spec = spec_of(db)
        try:
            await self.driver.stop(spec)
        except ComputeError as err:
            log.error("could not stop database %s: %s", db.id, err)
            async with self.db.session() as s:
                cur = await self._locked(s, db, State.STOPPING)
                if cur is not None:
                    await self.transition(
                        s,
                        cur,
                        State.ERROR,
                        {
                            "target_scale": 0,
                            "current_scale": 0,
                            "last_error": str(err)[:2000],
                        },
                    )
            await self.committed(db.id)
            return False
        size = await self.driver.storage_bytes(spec)
        async with self.db.session() as s:
            cur = await self._locked(s, db, State.STOPPING)
            if cur is not None:
                t = now()
                await repo.close_runs(s, cur.id, t)
                await repo.delete_expired_leases(s, cur.id, t)
                stopped = {
                    "current_scale": 0,
                    "worker_id": "",
                    "writer_host": "",
                    "writer_port": 0,
                    "active_connections": 0,
                    "storage_bytes": size,
                }
                # A lease that came while stopping wants a writer again: boot once stopped.
                nxt = State.BOOTING if cur.target_scale == 1 else State.STOPPED
                await self.transition(s, cur, nxt, stopped)
        await self.committed(db.id)
        return cur is None or cur.target_scale == 1

    async def _delete(self, db: Db) -> bool:
        try:
            await self.driver.destroy(spec_of(db))
        except (ComputeError, OSError) as err:
            log.error("could not destroy database %s: %s", db.id, err)
            return False
        async with self.db.session() as s:
            cur = await self._locked(s, db, State.DELETING)
            if cur is not None:
                await repo.close_runs(s, cur.id, now())
                await repo.delete_database(s, cur.tenant_id, cur.id)  # leases go with it (cascade)
                await events.publish(self.outbox, s, events.DELETED, replace(cur, updated_at=now()))
        await self.committed(db.id)
        return False

    async def _lost(self, db: Db) -> bool:
        async with self.db.session() as s:
            cur = await self._locked(s, db, State.READY, worker_id=db.worker_id)
            # Re-checked under the lock: a stop or a newer writer may have raced the monitor.
            if cur is None or await self.driver.is_alive(spec_of(cur)):
                return False
            await repo.close_runs(s, cur.id, now())
            await repo.delete_expired_leases(s, cur.id, now())
            await self.transition(
                s,
                cur,
                State.STOPPED,
                {
                    "current_scale": 0,
                    "target_scale": 0,
                    "worker_id": "",
                    "writer_host": "",
                    "writer_port": 0,
                    "active_connections": 0,
                    "lease_control_epoch": cur.lease_control_epoch + 1,
                    "last_error": "compute process exited",
                },
                event=events.COMPUTE_LOST,
                lost_worker_id=cur.worker_id,
            )
        COMPUTES_LOST.inc()
        log.warning("compute %s of database %s died; marked stopped", cur.worker_id, cur.id)
        await self.committed(db.id)
        return False

    async def _reap(self, db: Db) -> bool:
        log.warning("database %s is %s but its compute runs; stopping it", db.id, db.state)
        try:
            await self.driver.stop(spec_of(db))
        except ComputeError:
            log.warning("could not stop the stray compute of %s", db.id, exc_info=True)
        return False

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
        while True:
            await asyncio.sleep(self.reconcile_interval)
            try:
                async with self.db.session() as s:
                    keys = await repo.keys_in_states(s, UNFINISHED)
                for tenant_id, db_id in keys:
                    if db_id not in self._tasks:
                        self.kick(tenant_id, db_id)
            except Exception:
                log.warning("reconcile pass failed; retrying", exc_info=True)

    async def monitor_loop(self) -> None:
        """Notice a writer that died while `ready` (crash, OOM kill, kill -9)."""
        while True:
            await asyncio.sleep(self.monitor_interval)
            try:
                async with self.db.session() as s:
                    ready = await self._ready_specs(s)
                for tenant_id, db_id, spec in ready:
                    if db_id not in self._tasks and not await self.driver.is_alive(spec):
                        self.kick(tenant_id, db_id)
            except Exception:
                log.warning("compute monitor pass failed; retrying", exc_info=True)

    async def _ready_specs(self, s: AsyncSession) -> list[tuple[str, str, ComputeSpec]]:
        out = []
        for tenant_id, db_id in await repo.keys_in_states(s, (State.READY.value,)):
            db = await repo.get(s, tenant_id, db_id)
            if db is not None:
                out.append((tenant_id, db_id, spec_of(db)))
        return out

    async def idle_loop(self) -> None:
        interval = min(max(self.idle_timeout.total_seconds() / 4, 0.2), 5.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.stop_idle()
            except Exception:
                log.warning("idle stop pass failed; retrying", exc_info=True)

    async def storage_loop(self) -> None:
        """Keep storage_bytes (billing, quota) near the truth for running databases."""
        while True:
            await asyncio.sleep(self.storage_interval)
            try:
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
            except Exception:
                log.warning("storage measurement failed; retrying", exc_info=True)

    async def credentials_loop(self) -> None:
        """Follow accounts' `tenant.credentials_rotated` events and give the running writers of
        that tenant the new verifier at once (stopped ones get it at their next boot)."""
        last = ""
        while True:
            try:
                async for ev in self.accounts.watch(["tenant.credentials_rotated"], last):
                    last = ev.id
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
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
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
                if db.state == State.READY:
                    db = await self.transition(s, db, State.STOPPING, {"target_scale": 0}, reason="shutdown")
                await self.transition(
                    s,
                    db,
                    State.STOPPED,
                    {
                        "current_scale": 0,
                        "target_scale": 0,
                        "worker_id": "",
                        "writer_host": "",
                        "writer_port": 0,
                        "active_connections": 0,
                    },
                    reason="shutdown",
                )

        results = await asyncio.gather(*(stop_one(t, d) for t, d in keys), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.warning("could not stop a compute at shutdown: %s", r)
        await self.outbox.notify()
