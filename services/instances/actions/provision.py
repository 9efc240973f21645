"""`provisioning → starting` once the instance may be placed (services/instances/placement.py),
then on at once to bring the replicas up (`start`)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from services.instances.actions.common import held, set_state
from services.instances.actions.start import start
from services.instances.repository import Deployment, Instance

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler


async def provision(rc: Reconciler, inst: Instance, dep: Deployment | None) -> bool:
    # Placement first (the clusters service: every node drained holds the instance here, with
    # the reason; the reconciler's periodic pass asks again).
    if await held(rc, inst):
        return False
    if not await set_state(rc, inst, "starting"):
        return True  # changed meanwhile: the next step reads it again
    return await start(rc, replace(inst, state="starting"), dep)
