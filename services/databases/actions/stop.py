"""`stopping → stopped` (or `booting` again when a lease came while it stopped): stop the
writer, close its compute run and the expired leases, measure the storage."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from libs.timeutil import now
from services.databases import repository as repo
from services.databases.actions.common import STOPPED_WRITER, spec_of
from services.databases.compute.base import ComputeError
from services.databases.state import State

if TYPE_CHECKING:
    from services.databases.lifecycle import Lifecycle
    from services.databases.repository import Db

log = logging.getLogger("ctrlmesh.databases.actions")


async def stop(lc: Lifecycle, db: Db) -> bool:
    spec = spec_of(db)
    try:
        await lc.driver.stop(spec)
    except ComputeError as err:
        log.error("could not stop database %s: %s", db.id, err)
        await lc.fail(db, State.STOPPING, err, target_scale=0, current_scale=0)
        return False
    size = await lc.driver.storage_bytes(spec)
    async with lc.db.session() as s:
        cur = await lc.locked(s, db, State.STOPPING)
        if cur is not None:
            t = now()
            await repo.close_runs(s, cur.id, t)
            await repo.delete_expired_leases(s, cur.id, t)
            # A lease that came while stopping wants a writer again: boot once stopped.
            nxt = State.BOOTING if cur.target_scale == 1 else State.STOPPED
            await lc.transition(s, cur, nxt, {**STOPPED_WRITER, "storage_bytes": size})
    await lc.committed(db.id)
    return cur is None or cur.target_scale == 1
