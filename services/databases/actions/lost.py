"""A writer that died while `ready` (crash, OOM kill, kill -9) is recorded `stopped` with a
bumped `lease_control_epoch` (gateways re-route) and `database.compute_lost`; a writer that runs
while its row says it should not (`reap`) is stopped."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import Counter

from libs.timeutil import now
from services.databases import events
from services.databases import repository as repo
from services.databases.actions.common import STOPPED_WRITER, spec_of
from services.databases.compute.base import ComputeError
from services.databases.state import State

if TYPE_CHECKING:
    from services.databases.lifecycle import Lifecycle
    from services.databases.repository import Db

log = logging.getLogger("ctrlmesh.databases.actions")

COMPUTES_LOST = Counter("ctrlmesh_databases_computes_lost_total", "Writers that died while ready")


async def lost(lc: Lifecycle, db: Db) -> bool:
    async with lc.db.session() as s:
        cur = await lc.locked(s, db, State.READY, worker_id=db.worker_id)
        # Re-checked under the lock: a stop or a newer writer may have raced the monitor.
        if cur is None or await lc.driver.is_alive(spec_of(cur)):
            return False
        await repo.close_runs(s, cur.id, now())
        await repo.delete_expired_leases(s, cur.id, now())
        await lc.transition(
            s,
            cur,
            State.STOPPED,
            {
                **STOPPED_WRITER,
                "target_scale": 0,
                "lease_control_epoch": cur.lease_control_epoch + 1,
                "last_error": "compute process exited",
            },
            event=events.COMPUTE_LOST,
            lost_worker_id=cur.worker_id,
        )
    COMPUTES_LOST.inc()
    log.warning("compute %s of database %s died; marked stopped", cur.worker_id, cur.id)
    await lc.committed(db.id)
    return False


async def reap(lc: Lifecycle, db: Db) -> bool:
    log.warning("database %s is %s but its compute runs; stopping it", db.id, db.state)
    try:
        await lc.driver.stop(spec_of(db))
    except ComputeError:
        log.warning("could not stop the stray compute of %s", db.id, exc_info=True)
    return False
