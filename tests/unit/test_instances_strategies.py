"""The deployment strategies: each one's order of steps against a recording rollout, and the
registry the executor dispatches on."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from services.instances.executor import Executor, Run, _Rollout
from services.instances.providers.base import GroupSpec, Replica
from services.instances.repository import Deployment
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


# -- the drain before old replicas stop -----------------------------------------------------------


class _MemoryRun(Run):
    """A deployment run kept in memory (the executor's Run saves to the database)."""

    def __init__(self, row: Deployment):
        self.row = row

    async def save(self, **values: Any) -> None:
        self.row = replace(self.row, **values)


class _Engine:
    """An engine with one group of old replicas that writes down what the ingress would see at
    each scale: the slots ListReplicaEndpoints leaves out (the run's `progress.leaving`)."""

    def __init__(self, run: _MemoryRun, old: GroupSpec, count: int):
        self.run, self.old = run, old
        self.reps = [Replica(f"c{i}", "web", old.release_id, i, "running") for i in range(count)]
        self.seen: list[tuple[int, list[str], float]] = []

    async def replicas(self, instance_id: str) -> list[Replica]:
        return list(self.reps)

    async def scale_group(self, group: GroupSpec, count: int) -> None:
        self.seen.append((count, list(self.run.row.progress.get("leaving") or []), time.monotonic()))
        self.reps = [r for r in self.reps if r.index < count]


def _deployment() -> Deployment:
    at = datetime.now(UTC)
    return Deployment(
        "dep_1",
        "ten_1",
        "inst_1",
        "rel_2",
        "rel_1",
        "running",
        "rolling",
        False,
        [],
        {},
        "",
        "",
        "",
        "",
        False,
        at,
        None,
        at,
        at,
    )


def test_old_replicas_leave_the_ingress_and_drain_before_they_stop():
    """Scaling the previous release down first names the replicas about to stop in the run's
    progress (the ingress drops them), waits the drain time, then stops them and clears it."""
    run = _MemoryRun(_deployment())
    old = GroupSpec("inst_1", "ten_1", "rel_1", {"name": "web"})
    engine = _Engine(run, old, 3)
    ex = Executor(None, None, gate_timeout=5, settle=0, drain=0.2)  # type: ignore[arg-type]
    rollout = _Rollout(ex, run, engine, old, old, 3, [])  # type: ignore[arg-type]
    start = time.monotonic()
    asyncio.run(rollout.scale_old(1))
    [(count, leaving, at)] = engine.seen
    assert count == 1 and sorted(leaving) == ["web/rel_1/1", "web/rel_1/2"]
    assert at - start >= 0.2  # stopped only after the drain
    assert run.row.progress["leaving"] == []
    asyncio.run(rollout.scale_old(1))  # nothing leaves: no drain, no mark
    assert engine.seen[-1][1] == [] and time.monotonic() - engine.seen[-1][2] < 0.1
