"""`provisioning → starting` once the instance may be placed (services/instances/placement.py),
then on at once to bring the replicas up (`start`)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from services.instances import repository as repo
from services.instances.actions.common import set_state
from services.instances.actions.start import start
from services.instances.repository import Deployment, Instance, Scope

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler


async def provision(rc: Reconciler, inst: Instance, dep: Deployment | None) -> bool:
    # Placement first (the clusters service: every node drained holds the instance here, with
    # the reason; the reconciler's periodic pass asks again).
    reason = await rc.placement(inst.provider_name, inst.cluster_id) if rc.placement else ""
    if reason:
        if inst.last_error != reason:
            async with rc.db.session() as s:
                await repo.update_instance(
                    s, Scope.system(), inst.id, {"last_error": reason}, expect_state="provisioning"
                )
        return False
    if not await set_state(rc, inst, "starting"):
        return True  # changed meanwhile: the next step reads it again
    return await start(rc, replace(inst, state="starting"), dep)
