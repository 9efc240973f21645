"""`destroying → gone`: remove whatever the engine holds for the instance, then the row (its
children with it) and `instance.deleted`. An engine that is configured but away keeps the
instance `destroying` until it answers; one no longer configured is recorded as a warning."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from services.instances import repository as repo
from services.instances.repository import Deployment, Instance, Scope

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler


async def delete(rc: Reconciler, inst: Instance, dep: Deployment | None) -> bool:
    name, cluster = inst.provider_name, inst.cluster_id
    if rc.registry.has(name, cluster):
        removed = await rc.registry.get(name, cluster).remove_all(inst.id)
        # A second look: a replica being created while we removed would be left behind.
        if removed:
            await rc.registry.get(name, cluster).remove_all(inst.id)
        warning = ""
    elif name in rc.registry.configured or not rc.registry.on_configured(cluster):
        return False  # its engine is away (or not known yet); keep `destroying`, try again later
    else:
        warning = f"provider {name!r} is no longer configured; engine resources not removed"
    async with rc.outbox.session() as s:
        await repo.delete_instance(s, Scope.system(), inst.id)
        await rc.domain.publish(
            s,
            "instance.deleted",
            replace(inst, state="destroyed"),
            **({"warning": warning} if warning else {}),
        )
    return False
