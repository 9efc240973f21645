"""`running → stopping` when the instance is no longer wanted running (`wind_down`: its tenant
was suspended while it started), and `stopping → stopped` (`stop`): the engine stops it, then
the row says `stopped`, or `starting` again when it is wanted running by then."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from services.instances import repository as repo
from services.instances.actions.common import set_state
from services.instances.repository import Deployment, Instance, Scope

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler


async def wind_down(rc: Reconciler, inst: Instance, dep: Deployment | None) -> bool:
    return await set_state(rc, inst, "stopping")


async def stop(rc: Reconciler, inst: Instance, dep: Deployment | None) -> bool:
    await rc.engine(inst).stop(inst.id)
    # Decided on the row as it is now, under its lock: the desired state read before the stop
    # may be stale (a restart, or an unsuspend or start that came while it stopped), and both
    # transitions commit together, so a crash between them cannot strand the instance stopped
    # while it should run.
    async with rc.outbox.session() as s:
        fresh = await repo.get_instance(s, Scope.system(), inst.id, lock=True)
        if fresh is None or fresh.state != "stopping":
            return True
        await rc.domain.transition(s, fresh, "stopped", endpoints=[])
        again = fresh.desired_state == "running"
        if again:
            await rc.domain.transition(s, replace(fresh, state="stopped", endpoints=[]), "starting")
    return again
