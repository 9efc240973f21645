"""The reconcile actions of an instance, one module each: what `plan.next_action` names is done
by the function of the same name here. Each takes the `Reconciler` (the domain's transitions,
the engines, the executor) and the row as it was read (with its in-flight deployment), acts,
writes the outcome back under the row lock with its events, and returns True when another step
should follow at once. A step that raises is handed to `fail`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from services.instances.actions.delete import delete
from services.instances.actions.deploy import abandon, deploy
from services.instances.actions.fail import fail
from services.instances.actions.plan import Action, next_action
from services.instances.actions.provision import provision
from services.instances.actions.scale import scale
from services.instances.actions.start import start
from services.instances.actions.stop import stop, wind_down
from services.instances.repository import Deployment, Instance

if TYPE_CHECKING:
    from services.instances.reconciler import Reconciler

ActionFn = Callable[["Reconciler", Instance, Deployment | None], Awaitable[bool]]

ACTIONS: dict[Action, ActionFn] = {
    Action.DELETE: delete,
    Action.DEPLOY: deploy,
    Action.ABANDON: abandon,
    Action.PROVISION: provision,
    Action.START: start,
    Action.STOP: stop,
    Action.WIND_DOWN: wind_down,
    Action.SCALE: scale,
}

__all__ = ["ACTIONS", "Action", "ActionFn", "fail", "next_action"]
