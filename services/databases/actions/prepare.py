"""`creating → stopped`: the storage (initdb, the tenant's role, its database), never on the
wake path. Any failure leaves the storage unusable: `error`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from services.databases.actions.common import spec_of
from services.databases.state import State

if TYPE_CHECKING:
    from services.databases.lifecycle import Lifecycle
    from services.databases.repository import Db

log = logging.getLogger("ctrlmesh.databases.actions")


async def prepare(lc: Lifecycle, db: Db) -> bool:
    spec = spec_of(db)
    try:
        verifier = await lc.accounts.role_verifier(db.pg_user)
        await lc.driver.prepare(spec, verifier)
        size = await lc.driver.storage_bytes(spec)
    except Exception as err:  # whatever failed, the storage is not usable: `error`
        log.error("could not prepare database %s: %s", db.id, err)
        await lc.fail(db, State.CREATING, err)
        return False
    async with lc.db.session() as s:
        cur = await lc.locked(s, db, State.CREATING)
        if cur is not None:
            await lc.transition(s, cur, State.STOPPED, {"storage_bytes": size, "last_error": ""})
    await lc.committed(db.id)
    return cur is None  # deleted meanwhile: drive again
