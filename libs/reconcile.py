"""The reconcile engine every service drives its resources with.

Desired state lives in a row; an action moves the real world (a compute, a container) one step
toward it and writes the outcome back. Two pieces make that safe and resumable:

- `KeyedRunner`: at most one drive per resource key at a time. `kick(key)` makes sure a drive
  runs soon; a kick that arrives during a drive makes it run once more when it ends, so no
  decision recorded meanwhile is missed. A drive calls the service's `step(key)` until it says
  there is nothing more to do; a failing step is logged and counted, and the row (which still
  says what is wanted) is picked up again by the service's periodic pass.
- `Claims`: the single flight held in PostgreSQL, so two processes of one service never drive
  the same resource at once. A claim is a row (key, owner, expiry) in the service's schema,
  taken with one conditional upsert, renewed while the drive runs and deleted when it ends. A
  process that dies leaves its claims to expire; the next owner takes them over and, because
  every step starts from the row, resumes the action where it stopped.

`every()` is the one periodic loop: an interval with jitter, failures logged and counted, clean
cancellation.

Metrics (ops/ dashboards and alerts read them): every runner and loop has its series from the
moment it is built, at zero, so a dashboard shows "no failures" rather than "no data".
`ctrlmesh_reconcile_lag_seconds{runner}` is how long the oldest key kicked and not yet settled
has been waiting (0 when every drive is done): a resource the engine cannot converge keeps it
growing only while its drive runs, so the failure counters and the drive histogram go with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from datetime import timedelta
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import Column, DateTime, MetaData, String, Table, func
from sqlalchemy.dialects.postgresql import insert

from libs.db import Database

log = logging.getLogger("ctrlmesh.reconcile")

DRIVE_FAILURES = Counter("ctrlmesh_reconcile_step_failures_total", "Reconcile steps that raised", ["runner"])
LOOP_FAILURES = Counter("ctrlmesh_periodic_failures_total", "Periodic passes that raised", ["loop"])
CLAIMS_LOST = Counter("ctrlmesh_reconcile_claims_lost_total", "Drives stopped: claim lost", ["runner"])
DRIVES = Counter("ctrlmesh_reconcile_drives_total", "Drives that settled (or yielded)", ["runner"])
DRIVE_SECONDS = Histogram(
    "ctrlmesh_reconcile_drive_seconds",
    "First kick of a key to its drive settling",
    ["runner"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LAG = Gauge("ctrlmesh_reconcile_lag_seconds", "Age of the oldest kicked key not yet settled", ["runner"])
LOOP_PASSES = Counter("ctrlmesh_periodic_passes_total", "Periodic passes that completed", ["loop"])
LOOP_LAST_SUCCESS = Gauge(
    "ctrlmesh_periodic_last_success_timestamp_seconds", "When a periodic pass last completed", ["loop"]
)

K = TypeVar("K", bound=Hashable)


def claims_table(metadata: MetaData) -> Table:
    """The claims of a service's reconcile drives, in the service's own schema."""
    return Table(
        "reconcile_claims",
        metadata,
        Column("key", String(128), primary_key=True),
        Column("owner", String(128), nullable=False),
        Column("expires_at", DateTime(timezone=True), nullable=False),
    )


def process_owner(service: str) -> str:
    """A claim owner unique to this process (a restarted process is a new owner)."""
    return f"{service}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Claims:
    """Exclusive, expiring claims on resource keys, held in PostgreSQL."""

    def __init__(self, db: Database, table: Table, owner: str, ttl: timedelta = timedelta(seconds=15)):
        self.db = db
        self.table = table
        self.owner = owner
        self.ttl = ttl

    async def acquire(self, key: str) -> bool:
        """Take the claim if it is free, expired, or already ours (then it is extended)."""
        t = self.table
        expires = func.now() + self.ttl
        stmt = (
            insert(t)
            .values(key=key, owner=self.owner, expires_at=expires)
            .on_conflict_do_update(
                index_elements=[t.c.key],
                set_={"owner": self.owner, "expires_at": expires},
                where=(t.c.owner == self.owner) | (t.c.expires_at < func.now()),
            )
            .returning(t.c.owner)
        )
        async with self.db.session() as s:
            row = (await s.execute(stmt)).first()
        return row is not None

    async def renew(self, key: str) -> bool:
        """Extend our claim; False when it is no longer ours (expired and taken over)."""
        t = self.table
        expires = func.now() + self.ttl
        async with self.db.session() as s:
            res = await s.execute(
                t.update().where(t.c.key == key, t.c.owner == self.owner).values(expires_at=expires)
            )
        return bool(getattr(res, "rowcount", 0))

    async def release(self, key: str) -> None:
        t = self.table
        async with self.db.session() as s:
            await s.execute(t.delete().where(t.c.key == key, t.c.owner == self.owner))

    async def release_all(self) -> None:
        """On a clean stop: hand every claim of this process over at once."""
        t = self.table
        async with self.db.session() as s:
            await s.execute(t.delete().where(t.c.owner == self.owner))


class KeyedRunner(Generic[K]):
    """One drive per key; with `claims`, one per key across every process of the service.

    `step(key)` is one step toward desired state; it returns True when another step should follow
    at once. `claim_key(key)` names the key in the claims table.
    """

    def __init__(
        self,
        name: str,
        step: Callable[[K], Awaitable[bool]],
        *,
        claims: Claims | None = None,
        claim_key: Callable[[K], str] = str,
        max_steps: int = 0,
    ):
        self.name = name
        self.step = step
        self.claims = claims
        self.claim_key = claim_key
        # 0: a drive runs until its step says it is done; N: at most N steps, then it yields
        # (the periodic pass kicks it again) so one resource cannot monopolise its task.
        self.max_steps = max_steps
        self._tasks: dict[K, asyncio.Task[None]] = {}
        self._again: set[K] = set()
        # key → when it was first kicked since its last drive settled (monotonic)
        self._since: dict[K, float] = {}
        DRIVE_FAILURES.labels(name)
        CLAIMS_LOST.labels(name)
        DRIVES.labels(name)
        DRIVE_SECONDS.labels(name)
        LAG.labels(name).set_function(self.lag)

    def lag(self) -> float:
        """Seconds the oldest key kicked and not yet settled has been waiting; 0 when none."""
        if not self._since:
            return 0.0
        return max(0.0, time.monotonic() - min(self._since.values()))

    def busy(self, key: K) -> bool:
        task = self._tasks.get(key)
        return task is not None and not task.done()

    def kick(self, key: K) -> asyncio.Task[None]:
        """Make sure a drive of `key` runs (again) soon; returns its task."""
        self._since.setdefault(key, time.monotonic())
        task = self._tasks.get(key)
        if task is not None and not task.done():
            self._again.add(key)
            return task
        task = asyncio.create_task(self._drive(key), name=f"{self.name}-{key}")
        self._tasks[key] = task
        return task

    async def run(self, key: K) -> None:
        """Kick and wait for the drive to settle; a cancelled caller does not cancel the drive."""
        await asyncio.shield(self.kick(key))

    async def _drive(self, key: K) -> None:
        claim = self.claim_key(key)
        try:
            if self.claims is not None:
                if not await self.claims.acquire(claim):
                    log.debug("%s %s is driven by another process", self.name, claim)
                    return
                renew = asyncio.create_task(self._keep_claim(claim, asyncio.current_task()))
            try:
                await self._steps(key)
            finally:
                if self.claims is not None:
                    renew.cancel()
                    try:
                        await self.claims.release(claim)
                    except Exception:
                        log.warning("could not release the claim on %s %s", self.name, key, exc_info=True)
        finally:
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]
                since = self._since.pop(key, None)
                if since is not None:
                    DRIVES.labels(self.name).inc()
                    DRIVE_SECONDS.labels(self.name).observe(time.monotonic() - since)

    async def _steps(self, key: K) -> None:
        steps = 0
        while True:
            self._again.discard(key)
            try:
                again = await self.step(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The row still says what is wanted: the service's periodic pass retries it.
                DRIVE_FAILURES.labels(self.name).inc()
                log.exception("%s of %s failed; will retry", self.name, key)
                again = False
            steps += 1
            if self.max_steps and steps >= self.max_steps:
                return
            if not again and key not in self._again:
                return

    async def _keep_claim(self, key: str, drive: asyncio.Task[Any] | None) -> None:
        assert self.claims is not None
        interval = self.claims.ttl.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                held = await self.claims.renew(key)
            except Exception:
                log.warning("could not renew the claim on %s %s", self.name, key, exc_info=True)
                continue
            if not held:
                CLAIMS_LOST.labels(self.name).inc()
                log.error("lost the claim on %s %s; stopping its drive", self.name, key)
                if drive is not None:
                    drive.cancel()
                return

    async def shutdown(self) -> None:
        """Cancel every drive (the rows say what is left; the next start resumes them)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.claims is not None:
            try:
                await self.claims.release_all()
            except Exception:
                log.warning("could not release the claims of %s", self.name, exc_info=True)


async def every(
    name: str,
    interval: float,
    fn: Callable[[], Awaitable[Any]],
    *,
    jitter: float = 0.1,
    first: float | None = None,
    wake: asyncio.Event | None = None,
) -> None:
    """Run `fn` every `interval` seconds (± `jitter` of it) until cancelled; a failing pass is
    logged and counted and the next one runs on time. `first`: the delay before the first pass
    (default: one interval). `wake`: setting it runs the next pass at once."""
    delay = interval if first is None else first
    LOOP_FAILURES.labels(name)
    passes, last_success = LOOP_PASSES.labels(name), LOOP_LAST_SUCCESS.labels(name)
    while True:
        if delay > 0:
            if wake is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(wake.wait(), delay)
                except TimeoutError:
                    pass
                wake.clear()
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            LOOP_FAILURES.labels(name).inc()
            log.warning("%s pass failed; retrying", name, exc_info=True)
        else:
            passes.inc()
            last_success.set_to_current_time()
        delay = interval * (1 + random.uniform(-jitter, jitter)) if jitter else interval
