"""A step that raised: the instance goes to `failed` with the cause where the state machine
allows it; a running instance keeps running and only records the cause (and stops retrying the
change it could not apply)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.instances import repository as repo
from services.instances import specs
from services.instances.repository import Instance, Scope

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler


async def fail(rc: Reconciler, inst: Instance, error: str) -> None:
    async with rc.outbox.session() as s:
        fresh = await repo.get_instance(s, Scope.system(), inst.id, lock=True)
        if fresh is None or fresh.state == "failed":
            return
        if specs.can_transition(fresh.state, "failed"):
            await rc.domain.transition(s, fresh, "failed", last_error=error[:2000])
        elif fresh.state == "running":
            await repo.update_instance(
                s,
                Scope.system(),
                fresh.id,
                {"last_error": error[:2000], "observed_generation": fresh.generation},
            )
