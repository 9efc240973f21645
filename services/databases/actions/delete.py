"""`deleting → gone`: destroy the compute and the storage, then the row (its leases go with it)
and the `database.deleted` event. A failed destroy stays `deleting` and is retried."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from libs.timeutil import now
from services.databases import events
from services.databases import repository as repo
from services.databases.actions.common import spec_of
from services.databases.compute.base import ComputeError
from services.databases.state import State

if TYPE_CHECKING:
    from services.databases.lifecycle import Lifecycle
    from services.databases.repository import Db

log = logging.getLogger("ctrlmesh.databases.actions")


async def delete(lc: Lifecycle, db: Db) -> bool:
    try:
        await lc.driver.destroy(spec_of(db))
    except (ComputeError, OSError) as err:
        log.error("could not destroy database %s: %s", db.id, err)
        return False
    async with lc.db.session() as s:
        cur = await lc.locked(s, db, State.DELETING)
        if cur is not None:
            await repo.close_runs(s, cur.id, now())
            await repo.delete_database(s, cur.tenant_id, cur.id)  # leases go with it (cascade)
            await events.publish(lc.outbox, s, events.DELETED, replace(cur, updated_at=now()))
    await lc.committed(db.id)
    return False
