"""What the reconciler does for an instance, as data: the action `next_action` names for the row
(and its in-flight deployment, if any) is done by the function of the same name in this package.

    provisioning ─provision─▶ starting ─start─▶ running ─wind_down─▶ stopping ─stop─▶ stopped
                                                  │ ▲                    └─(wanted again)─▶ starting
                                   deploy, scale  └─┘
    any ──(DELETE)──▶ destroying ─delete─▶ (gone)            a step that raises: `fail`

A deployment is rolled out only while the instance is running and wanted running; one whose
instance is leaving `running` is abandoned (cancelled) before any other step.
"""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    NONE = "none"
    DELETE = "delete"  # remove whatever the engine holds, then the row
    DEPLOY = "deploy"  # roll the in-flight deployment out (the executor), refresh endpoints
    ABANDON = "abandon"  # the instance is leaving `running`: cancel its deployment
    PROVISION = "provision"  # `starting`, then bring the replicas up
    START = "start"  # bring every group of the current release up, then `running`
    STOP = "stop"  # stop on the engine, then `stopped` (or `starting` when wanted again)
    WIND_DOWN = "wind_down"  # running but no longer wanted (a suspended tenant): `stopping`
    SCALE = "scale"  # apply an in-place change (replicas, resources) the engine has not seen


def next_action(state: str, desired_state: str, behind: bool, deployment: str | None) -> Action:
    """The action for an instance in `state` wanting `desired_state`, `behind` when its
    generation is ahead of what the engine has applied, with an in-flight deployment in state
    `deployment` (None without one)."""
    if state == "destroying":
        return Action.DELETE
    if deployment is not None and state == "running" and desired_state == "running":
        return Action.DEPLOY
    if deployment in ("pending", "running"):
        return Action.ABANDON
    if state == "provisioning":
        return Action.PROVISION
    if state == "starting":
        return Action.START
    if state == "stopping":
        return Action.STOP
    if state == "running" and desired_state != "running":
        return Action.WIND_DOWN
    if state == "running" and behind:
        return Action.SCALE
    return Action.NONE
