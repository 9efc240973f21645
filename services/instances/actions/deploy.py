"""The in-flight deployment of a running instance, rolled out by the executor (executor.py, with
the deployment's strategy), then the endpoints read again; and `abandon`: a deployment whose
instance is leaving `running` is cancelled, since its rollout cannot go on.

A rollout places new replicas, so a deployment that has not started asks placement first: with
every node of the cluster drained it stays `pending` (the instance's `state_reason` says why)
and the running release keeps serving; it starts once a node is undrained. One already rolling
goes on (drain stops new placements, not the work under way)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.instances import repository as repo
from services.instances.actions.common import held
from services.instances.endpoints import endpoints_of
from services.instances.placement import WAITING
from services.instances.repository import Deployment, Instance, Scope, now

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler


async def deploy(rc: Reconciler, inst: Instance, dep: Deployment | None) -> bool:
    assert dep is not None  # chosen only with a deployment in flight
    provider = rc.engine(inst)
    was_held = inst.last_error.startswith(WAITING)
    if dep.state == "pending" and await held(rc, inst):
        return False
    await rc.executor.run(inst, dep, provider)
    async with rc.db.session() as s:
        fresh = await repo.get_instance(s, Scope.system(), inst.id)
    if fresh is not None:
        reps = await provider.replicas(inst.id)
        values: dict[str, object] = {"endpoints": endpoints_of(fresh, reps)}
        if was_held:
            values["last_error"] = ""  # the wait is over
        async with rc.db.session() as s:
            await repo.update_instance(s, Scope.system(), inst.id, values)
    return True


async def abandon(rc: Reconciler, inst: Instance, dep: Deployment | None) -> bool:
    assert dep is not None  # chosen only with a deployment in flight
    async with rc.db.session() as s:
        await repo.update_deployment(
            s,
            Scope.system(),
            dep.id,
            {"state": "cancelled", "finished_at": now(), "error": "the instance stopped or was deleted"},
        )
    return True
