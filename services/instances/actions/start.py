"""`starting → running`: every group of the current release up and running on the engine, then
`running` with its endpoints, in one commit under the row lock."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.instances import repository as repo
from services.instances.actions.common import bring_up
from services.instances.endpoints import endpoints_of
from services.instances.repository import Deployment, Instance, Scope

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler


async def start(rc: Reconciler, inst: Instance, dep: Deployment | None) -> bool:
    reps = await bring_up(rc, rc.engine(inst), inst)
    async with rc.outbox.session() as s:
        fresh = await repo.get_instance(s, Scope.system(), inst.id, lock=True)
        if fresh is None or fresh.state != "starting":
            return True
        await rc.domain.transition(
            s,
            fresh,
            "running",
            endpoints=endpoints_of(fresh, reps),
            last_error="",
            observed_generation=fresh.generation,
        )
    return True
