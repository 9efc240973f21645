"""The instance reconciler's choice of action: one action per row shape, each done by a module of
services/instances/actions."""

from __future__ import annotations

import pytest

from services.instances.actions import ACTIONS, Action, next_action

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("state", "desired", "behind", "deployment", "action"),
    [
        ("destroying", "destroyed", False, None, Action.DELETE),
        ("destroying", "destroyed", False, "running", Action.DELETE),
        ("running", "running", False, "pending", Action.DEPLOY),
        ("running", "running", True, "running", Action.DEPLOY),
        ("running", "stopped", False, "running", Action.ABANDON),
        ("stopping", "stopped", False, "pending", Action.ABANDON),
        ("provisioning", "running", False, None, Action.PROVISION),
        ("starting", "running", False, None, Action.START),
        ("stopping", "running", False, None, Action.STOP),
        ("running", "stopped", True, None, Action.WIND_DOWN),
        ("running", "running", True, None, Action.SCALE),
        ("running", "running", False, None, Action.NONE),
        ("stopped", "stopped", False, None, Action.NONE),
        ("failed", "running", True, None, Action.NONE),
    ],
)
def test_next_action_names_the_one_step_toward_desired_state(
    state: str, desired: str, behind: bool, deployment: str | None, action: Action
) -> None:
    """Delete beats everything; a deployment goes on only while running and wanted running, and
    is abandoned otherwise before any other step; then the lifecycle states in order."""
    assert next_action(state, desired, behind, deployment) is action


def test_every_action_but_none_has_its_module() -> None:
    """The reconciler dispatches on ACTIONS: no action the plan can name is missing there."""
    assert set(ACTIONS) == set(Action) - {Action.NONE}
    for action, fn in ACTIONS.items():
        assert fn.__module__.startswith("services.instances.actions."), action
