"""The reconcile actions of a database, one module each: what `state.next_action` names is done
by the function of the same name here. Each takes the `Lifecycle` (the transitions, the driver,
accounts) and the row as it was read, acts, writes the outcome back under the row lock with
its event, and returns True when another step should follow at once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from services.databases.actions.boot import boot
from services.databases.actions.delete import delete
from services.databases.actions.handoff import handoff
from services.databases.actions.lost import lost, reap
from services.databases.actions.prepare import prepare
from services.databases.actions.stop import stop
from services.databases.state import Action

if TYPE_CHECKING:
    from services.databases.lifecycle import Lifecycle
    from services.databases.repository import Db

ActionFn = Callable[["Lifecycle", "Db"], Awaitable[bool]]

ACTIONS: dict[Action, ActionFn] = {
    Action.PREPARE: prepare,
    Action.BOOT: boot,
    Action.STOP: stop,
    Action.DELETE: delete,
    Action.LOST: lost,
    Action.REAP: reap,
    Action.HANDOFF: handoff,
}
