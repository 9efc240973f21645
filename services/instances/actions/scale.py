"""A running instance whose generation is ahead of the engine (a scale of replicas or resources):
bring the groups to the new size and record the generation applied, with the new endpoints.

A scale-up places new replicas, so it asks placement first (services/instances/placement.py):
with every node of the cluster drained, the whole change waits, with the reason as the
instance's `state_reason`, while the replicas already there keep running; the reconciler's
periodic pass asks again and applies it once a node is undrained. A scale that adds no replica
(down, or resources only) never waits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.instances import repository as repo
from services.instances import specs
from services.instances.actions.common import bring_up, held
from services.instances.endpoints import endpoints_of
from services.instances.providers.base import Provider
from services.instances.repository import Deployment, Instance, Scope

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler


async def _adds_replicas(provider: Provider, inst: Instance) -> bool:
    """Would the new size create a replica the engine does not hold yet?"""
    have: dict[str, int] = {}
    for r in await provider.replicas(inst.id):
        if r.release_id == inst.current_release:
            have[r.service] = have.get(r.service, 0) + 1
    services = specs.long_running(inst.spec["services"])
    return any(have.get(str(svc["name"]), 0) < inst.replicas for svc in services)


async def scale(rc: Reconciler, inst: Instance, dep: Deployment | None) -> bool:
    provider = rc.engine(inst)
    if rc.placement is not None and await _adds_replicas(provider, inst) and await held(rc, inst):
        return False
    reps = await bring_up(rc, provider, inst)
    async with rc.db.session() as s:
        await repo.update_instance(
            s,
            Scope.system(),
            inst.id,
            {"observed_generation": inst.generation, "endpoints": endpoints_of(inst, reps), "last_error": ""},
        )
    return True
