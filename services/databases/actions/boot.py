"""`booting → ready`: start the writer with the target profile and the tenant's current SCRAM
verifier, record where it listens and open a compute run (CU·h billing). A failed start goes to
`error` (the next lease retries)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from libs.timeutil import now
from services.databases import repository as repo
from services.databases.actions.common import spec_of
from services.databases.compute.base import ComputeError
from services.databases.compute.profiles import profile
from services.databases.state import State

if TYPE_CHECKING:
    from services.databases.lifecycle import Lifecycle
    from services.databases.repository import Db

log = logging.getLogger("ctrlmesh.databases.actions")

COLD_STARTS = Counter("ctrlmesh_databases_cold_starts_total", "Writers started", ["outcome"])
BOOT_SECONDS = Histogram(
    "ctrlmesh_databases_boot_seconds",
    "booting → ready, control plane included",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


async def boot(lc: Lifecycle, db: Db) -> bool:
    if db.state == State.STOPPED:  # wanted but not marked booting (only after manual repair)
        async with lc.db.session() as s:
            cur = await lc.locked(s, db, State.STOPPED)
            if cur is None or cur.target_scale != 1:
                return True
            db = await lc.transition(s, cur, State.BOOTING)
        await lc.committed(db.id)
    spec = spec_of(db)
    prof = profile(db.target_profile)
    t0, started_at = time.monotonic(), now()
    try:
        # The verifier lookup runs while the server starts: the wake path pays for one.
        endpoint, verifier = await asyncio.gather(
            lc.driver.start(spec, prof), lc.accounts.role_verifier(db.pg_user)
        )
        if await lc.driver.role_verifier_applied(spec, verifier):
            # Unchanged since it was last set: route at once, and set it again behind (it
            # undoes a password the tenant may have changed from inside its own session).
            lc.background(lc.driver.set_role_verifier(spec, verifier), f"verifier of {db.id}")
        else:
            await lc.driver.set_role_verifier(spec, verifier)
    except Exception as err:  # whatever failed (driver, accounts, the admin login): not ready
        COLD_STARTS.labels("error").inc()
        log.error("could not start database %s: %s", db.id, err)
        try:
            await lc.driver.stop(spec)
        except ComputeError:
            log.warning("could not stop the failed compute of %s", db.id, exc_info=True)
        return await lc.fail(db, State.BOOTING, err, target_scale=0, current_scale=0)
    async with lc.db.session() as s:
        cur = await lc.locked(s, db, State.BOOTING)
        if cur is not None:
            await lc.transition(
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
    await lc.committed(db.id)
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
