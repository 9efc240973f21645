"""A running instance whose generation is ahead of the engine (a scale of replicas or resources):
bring the groups to the new size and record the generation applied, with the new endpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.instances import repository as repo
from services.instances.actions.common import bring_up
from services.instances.endpoints import endpoints_of
from services.instances.repository import Deployment, Instance, Scope

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler


async def scale(rc: Reconciler, inst: Instance, dep: Deployment | None) -> bool:
    reps = await bring_up(rc, rc.engine(inst), inst)
    async with rc.db.session() as s:
        await repo.update_instance(
            s,
            Scope.system(),
            inst.id,
            {"observed_generation": inst.generation, "endpoints": endpoints_of(inst, reps)},
        )
    return True
