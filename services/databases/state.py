"""The database state machine (SPG99 §5), as data: which `state` may follow which, and what the
reconciler must do to bring actual state (the compute) to desired state (`target_scale`,
`deleting`).

    creating ──▶ stopped ──(lease)──▶ booting ──▶ ready ──(idle)──▶ stopping ──▶ stopped
                    ▲                    │          │                  │
                    │                    ▼          ▼ (compute lost)   │ (lease while stopping)
                    └────────────────  error     stopped               └──▶ booting
    any ──(DELETE)──▶ deleting ──▶ (gone)

Decisions where SPG99 is silent:
- A compute that dies while `ready` is noticed by the monitor: the database goes straight to
  `stopped` (current_scale 0, lease_control_epoch bumped so Gateways re-acquire), with a
  `database.compute_lost` event; the next lease starts a new writer.
- A boot that fails goes to `error` (target_scale 0); the next lease retries it.
- A lease that arrives while `stopping` sets target_scale=1: the stop completes (a clean
  checkpoint), then the database boots again.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    CREATING = "creating"
    STOPPED = "stopped"
    BOOTING = "booting"
    READY = "ready"
    STOPPING = "stopping"
    ERROR = "error"
    DELETING = "deleting"


STATES = tuple(s.value for s in State)

TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATING: frozenset({State.STOPPED, State.ERROR, State.DELETING}),
    State.STOPPED: frozenset({State.BOOTING, State.DELETING}),
    State.BOOTING: frozenset({State.READY, State.ERROR, State.STOPPED, State.DELETING}),
    State.READY: frozenset({State.STOPPING, State.STOPPED, State.DELETING}),
    State.STOPPING: frozenset({State.STOPPED, State.BOOTING, State.ERROR, State.DELETING}),
    State.ERROR: frozenset({State.BOOTING, State.DELETING}),
    State.DELETING: frozenset(),
}

# States in which a compute may exist (a delete of these needs force=true).
RUNNING = frozenset({State.BOOTING, State.READY, State.STOPPING})
# States a lease can wake from: no writer, none wanted.
WAKEABLE = frozenset({State.STOPPED, State.ERROR})


def can_transition(src: str, dst: str) -> bool:
    return State(dst) in TRANSITIONS[State(src)]


class ScaleState(StrEnum):
    """The profile handoff (SPG99 §6.2), an axis independent of `state` (which stays `ready`
    throughout; see actions/handoff.py for the phases and the decisions where SPG99 is silent)."""

    STEADY = "STEADY"
    PREPARING = "PREPARING"
    FREEZING = "FREEZING"
    DRAINING = "DRAINING"
    STOPPING_OLD = "STOPPING_OLD"
    STARTING_NEW = "STARTING_NEW"
    SWITCHING = "SWITCHING"
    COOLDOWN = "COOLDOWN"
    FAILED = "FAILED"


# Phases in which a handoff runs (the reconciler drives them; nothing else touches the writer).
HANDOFF_ACTIVE = frozenset(
    {
        ScaleState.PREPARING,
        ScaleState.FREEZING,
        ScaleState.DRAINING,
        ScaleState.STOPPING_OLD,
        ScaleState.STARTING_NEW,
        ScaleState.SWITCHING,
    }
)
HANDOFF_ORDER = (
    ScaleState.STEADY,
    ScaleState.PREPARING,
    ScaleState.FREEZING,
    ScaleState.DRAINING,
    ScaleState.STOPPING_OLD,
    ScaleState.STARTING_NEW,
    ScaleState.SWITCHING,
    ScaleState.COOLDOWN,
)
SCALE_TRANSITIONS: dict[ScaleState, frozenset[ScaleState]] = {
    ScaleState.STEADY: frozenset({ScaleState.PREPARING}),
    ScaleState.PREPARING: frozenset({ScaleState.FREEZING, ScaleState.FAILED}),
    ScaleState.FREEZING: frozenset({ScaleState.DRAINING, ScaleState.FAILED}),
    ScaleState.DRAINING: frozenset({ScaleState.STOPPING_OLD, ScaleState.FAILED}),
    ScaleState.STOPPING_OLD: frozenset({ScaleState.STARTING_NEW, ScaleState.FAILED}),
    ScaleState.STARTING_NEW: frozenset({ScaleState.SWITCHING, ScaleState.FAILED}),
    ScaleState.SWITCHING: frozenset({ScaleState.COOLDOWN, ScaleState.FAILED}),
    ScaleState.COOLDOWN: frozenset({ScaleState.STEADY, ScaleState.PREPARING}),
    ScaleState.FAILED: frozenset({ScaleState.STEADY, ScaleState.PREPARING}),
}


def can_scale(src: str, dst: str) -> bool:
    return ScaleState(dst) in SCALE_TRANSITIONS[ScaleState(src)]


class Action(StrEnum):
    NONE = "none"
    PREPARE = "prepare"  # make the storage, then `stopped`
    BOOT = "boot"  # start the writer, then `ready`
    STOP = "stop"  # stop the writer, then `stopped` (or `booting` when wanted again)
    DELETE = "delete"  # stop, destroy the storage, remove the row
    LOST = "lost"  # the writer died while `ready`: record it, then `stopped`
    REAP = "reap"  # a writer runs though none should (e.g. left by a crash of this service)
    HANDOFF = "handoff"  # one phase of a profile handoff (actions/handoff.py)


def next_action(state: str, target_scale: int, alive: bool | None, scale_state: str = "STEADY") -> Action:
    """What the reconciler does for a database in `state` wanting `target_scale` writers, given
    whether its compute runs (`alive`; None when not checked). A `ready` database in a handoff
    phase is the handoff's: its writer is stopped and started by it, never seen as lost."""
    s = State(state)
    if s is State.READY and ScaleState(scale_state) in HANDOFF_ACTIVE:
        return Action.HANDOFF
    if s is State.CREATING:
        return Action.PREPARE
    if s is State.DELETING:
        return Action.DELETE
    if s is State.BOOTING:
        return Action.BOOT
    if s is State.STOPPING:
        return Action.STOP
    if s is State.READY:
        return Action.LOST if alive is False else Action.NONE
    if s is State.STOPPED and target_scale == 1:
        return Action.BOOT
    if s in (State.STOPPED, State.ERROR) and alive:
        return Action.REAP
    return Action.NONE
