"""What the instance actions share: the groups an instance runs, bringing them up, and a state
change with its events."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from services.instances import repository as repo
from services.instances import specs
from services.instances.providers.base import GroupSpec, Provider, ProviderError, Replica
from services.instances.repository import Instance, Scope

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler

# Replica states that mean it will not come up by itself.
DOWN = ("exited", "dead", "failed", "rejected")


async def groups(rc: Reconciler, inst: Instance) -> list[GroupSpec]:
    """The current release's groups; a (re)start runs with the current secret versions, any
    other bring-up (a scale) with the versions the release recorded."""
    services = specs.long_running(inst.spec["services"])
    return await rc.executor.groups(inst, inst.current_release, services, current=inst.state == "starting")


async def bring_up(rc: Reconciler, provider: Provider, inst: Instance) -> list[Replica]:
    """Every group of the current release at full strength and running; returns replicas."""
    # Leftovers of other releases (an interrupted rollout) must not serve beside this one.
    for r in await provider.replicas(inst.id):
        if r.release_id != inst.current_release:
            await provider.remove_group(inst.id, r.service, r.release_id)
    wanted = await groups(rc, inst)
    for g in wanted:
        await provider.scale_group(g, inst.replicas)
        await provider.update_resources(g)
    deadline = time.monotonic() + rc.start_timeout
    want = inst.replicas * len(wanted)
    while True:
        reps = [r for r in await provider.replicas(inst.id) if r.release_id == inst.current_release]
        bad = [r for r in reps if r.state in DOWN]
        if bad:
            raise ProviderError(f"replica {bad[0].index} of {bad[0].service} stopped ({bad[0].state})")
        if sum(r.running for r in reps) >= want:
            return reps
        if time.monotonic() > deadline:
            raise ProviderError(f"replicas did not start within {rc.start_timeout:g}s")
        await asyncio.sleep(0.2)


async def held(rc: Reconciler, inst: Instance) -> bool:
    """Whether the clusters registry says nothing new may be placed for `inst` now (every node
    drained); the reason is then recorded on the instance once, and the periodic pass asks again."""
    reason = await rc.placement(inst.provider_name, inst.cluster_id) if rc.placement else ""
    if reason and inst.last_error != reason:
        async with rc.db.session() as s:
            await repo.update_instance(
                s, Scope.system(), inst.id, {"last_error": reason}, expect_state=inst.state
            )
    return bool(reason)


async def set_state(rc: Reconciler, inst: Instance, state: str, **values: Any) -> bool:
    """`state` (with its events) if the instance is still where `inst` saw it."""
    async with rc.outbox.session() as s:
        return await rc.domain.transition(s, inst, state, **values)
