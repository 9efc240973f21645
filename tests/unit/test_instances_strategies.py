"""The deployment strategies: each one's order of steps against a recording rollout, and the
registry the executor dispatches on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.instances.strategies import DEFAULT, STRATEGIES, Rollout

pytestmark = pytest.mark.timeout(10)


class Recorder:
    """A rollout that only writes down what the strategy asked for."""

    def __init__(self, replicas: int, already: int = 0):
        self._n = replicas
        self._already = already
        self.calls: list[tuple[Any, ...]] = []

    @property
    def service(self) -> str:
        return "web"

    @property
    def replicas(self) -> int:
        return self._n

    async def step(self) -> None:
        self.calls.append(("step",))

    async def new_running(self) -> int:
        return self._already

    async def scale_new(self, count: int) -> None:
        self.calls.append(("new", count))

    async def scale_old(self, count: int) -> None:
        self.calls.append(("old", count))

    async def gate(self, count: int) -> None:
        self.calls.append(("gate", count))

    async def ready(self, ready: int, replaced: int, message: str) -> None:
        self.calls.append(("ready", ready, replaced))


def run(name: str, replicas: int, already: int = 0) -> list[tuple[Any, ...]]:
    r = Recorder(replicas, already)
    rollout: Rollout = r
    asyncio.run(STRATEGIES[name].run(rollout))
    return r.calls


def test_the_registry_holds_the_four_upstream_strategies_and_rolling_is_the_default():
    """Deploy accepts exactly rolling, recreate, blue-green and canary; an empty strategy is rolling."""
    assert sorted(STRATEGIES) == ["blue-green", "canary", "recreate", "rolling"]
    assert DEFAULT == "rolling" and all(s.name == n for n, s in STRATEGIES.items())


def test_rolling_replaces_one_replica_at_a_time_each_through_the_gate():
    """Rolling: one new replica up and healthy, then one old replica stops, for each replica."""
    step = [("step",)]
    assert run("rolling", 2) == [
        *step, ("new", 1), ("gate", 1), ("old", 1), ("ready", 1, 1),
        *step, ("new", 2), ("gate", 2), ("old", 0), ("ready", 2, 2),
    ]  # fmt: skip


def test_rolling_resumed_after_a_restart_continues_from_the_replicas_already_there():
    """A rollout interrupted after two of three new replicas picks up at the second, not the first."""
    calls = run("rolling", 3, already=2)
    assert [c for c in calls if c[0] == "new"] == [("new", 2), ("new", 3)]


def test_recreate_stops_every_old_replica_before_starting_the_new_set():
    """Recreate: all of the old set down, then all of the new set up and through the gate."""
    assert run("recreate", 3) == [
        ("step",), ("old", 0), ("ready", 0, 3), ("new", 3), ("gate", 3), ("ready", 3, 3),
    ]  # fmt: skip


def test_blue_green_keeps_the_old_set_serving_until_the_new_set_is_healthy():
    """Blue-green: the whole new set passes the gate before the old set is scaled to zero."""
    assert run("blue-green", 2) == [
        ("step",), ("new", 2), ("gate", 2), ("ready", 2, 0), ("step",), ("old", 0), ("ready", 2, 2),
    ]  # fmt: skip


def test_canary_gates_one_replica_before_the_rest_of_the_new_set():
    """Canary: one new replica healthy first, then the full new set, then the old set retires."""
    assert run("canary", 3) == [
        ("step",), ("new", 1), ("gate", 1), ("ready", 1, 0),
        ("step",), ("new", 3), ("gate", 3), ("ready", 3, 0), ("old", 0), ("ready", 3, 3),
    ]  # fmt: skip
