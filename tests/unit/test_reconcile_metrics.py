"""The reconcile engine's metrics (libs/reconcile.py) say what the ops/ dashboards and alerts read
from them: a runner's lag grows while a kicked key waits and falls back to 0 once it settles,
settled drives are counted and timed, and every runner and loop has its failure series at zero
before anything fails."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from libs.reconcile import KeyedRunner, every


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_lag_grows_while_a_drive_runs_and_returns_to_zero():
    """Lag is the age of the oldest unsettled key; drives and their time are recorded on settling."""
    release = asyncio.Event()

    async def step(key: str) -> bool:
        await release.wait()
        return False

    runner: KeyedRunner[str] = KeyedRunner("metrics test lag", step)
    assert _value("ctrlmesh_reconcile_lag_seconds", runner="metrics test lag") == 0.0
    assert _value("ctrlmesh_reconcile_step_failures_total", runner="metrics test lag") == 0.0
    assert _value("ctrlmesh_reconcile_drives_total", runner="metrics test lag") == 0.0
    task = runner.kick("a")
    await asyncio.sleep(0.2)
    runner.kick("a")  # a kick during the drive keeps the first kick's age
    lag = _value("ctrlmesh_reconcile_lag_seconds", runner="metrics test lag")
    assert lag is not None and 0.15 <= lag < 5
    release.set()
    await task
    await asyncio.sleep(0)
    assert _value("ctrlmesh_reconcile_lag_seconds", runner="metrics test lag") == 0.0
    assert _value("ctrlmesh_reconcile_drives_total", runner="metrics test lag") == 1.0
    total = _value("ctrlmesh_reconcile_drive_seconds_sum", runner="metrics test lag")
    assert total is not None and total >= 0.15


async def test_a_failing_step_is_counted_and_the_lag_clears():
    """A step that raises counts one failure; its key does not stay in the lag."""

    async def step(key: str) -> bool:
        raise RuntimeError("engine down")

    runner: KeyedRunner[str] = KeyedRunner("metrics test failing", step)
    await runner.kick("b")
    assert _value("ctrlmesh_reconcile_step_failures_total", runner="metrics test failing") == 1.0
    assert _value("ctrlmesh_reconcile_lag_seconds", runner="metrics test failing") == 0.0


async def test_periodic_passes_and_their_failures_are_counted():
    """every(): passes and failures per loop, and the time of the last good pass."""
    calls = {"n": 0}
    fourth = asyncio.Event()

    async def fn() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("one bad pass")
        if calls["n"] == 4:
            fourth.set()

    task = asyncio.create_task(every("metrics test loop", 0.01, fn, jitter=0, first=0))
    await asyncio.wait_for(fourth.wait(), 10)
    await asyncio.sleep(0)  # let the fourth pass be counted
    task.cancel()
    passes = _value("ctrlmesh_periodic_passes_total", loop="metrics test loop")
    assert passes is not None and passes >= 3
    assert _value("ctrlmesh_periodic_failures_total", loop="metrics test loop") == 1.0
    last = _value("ctrlmesh_periodic_last_success_timestamp_seconds", loop="metrics test loop")
    assert last is not None and last > 1e9
