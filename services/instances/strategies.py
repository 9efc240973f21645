"""Deployment strategies, one object each, written against one service's rollout: the group of
the new release, the group of the previous one, and the replica count both should end at.

- rolling: one new replica up and through the health gate, then one old replica stops; repeat;
- recreate: every old replica stops, then the new set starts and passes the gate;
- blue-green: the whole new set starts and passes the gate while the old set serves; then switch;
- canary: one new replica passes the gate first; then the rest of the new set; then switch.

A strategy only orders the steps. The executor (executor.py) supplies the `Rollout`: it checks
for a cancel at each `step`, reads the engine's actual replicas (so running a strategy again after
a restart continues where it stopped) and records progress; a failed gate or a cancel raises out
of the strategy and the executor restores the previous release.
"""

from __future__ import annotations

from typing import Protocol


class Rollout(Protocol):
    """What a strategy may do to one service of one deployment."""

    @property
    def service(self) -> str: ...

    @property
    def replicas(self) -> int:
        """The count both groups are measured against (the instance's replicas)."""
        ...

    async def step(self) -> None:
        """A point where a requested cancel stops the rollout."""

    async def new_running(self) -> int:
        """Replicas of the new release the engine already has (a resumed rollout)."""
        ...

    async def scale_new(self, count: int) -> None: ...

    async def scale_old(self, count: int) -> None: ...

    async def gate(self, count: int) -> None:
        """Wait until the first `count` new replicas run and pass the health checks."""

    async def ready(self, ready: int, replaced: int, message: str) -> None:
        """Record progress: new replicas ready, old replicas replaced."""


class Strategy(Protocol):
    name: str

    async def run(self, r: Rollout) -> None: ...


class Rolling:
    name = "rolling"

    async def run(self, r: Rollout) -> None:
        n = r.replicas
        for i in range(max(1, await r.new_running()), n + 1):
            await r.step()
            await r.scale_new(i)
            await r.gate(i)
            await r.scale_old(n - i)
            await r.ready(i, i, f"{i}/{n} replicas of {r.service} replaced")


class Recreate:
    name = "recreate"

    async def run(self, r: Rollout) -> None:
        n = r.replicas
        await r.step()
        await r.scale_old(0)
        await r.ready(0, n, "previous replicas stopped")
        await r.scale_new(n)
        await r.gate(n)
        await r.ready(n, n, f"{n}/{n} new replicas healthy")


class BlueGreen:
    name = "blue-green"

    async def run(self, r: Rollout) -> None:
        n = r.replicas
        await r.step()
        await r.scale_new(n)
        await r.gate(n)
        await r.ready(n, 0, "new set healthy; switching")
        await r.step()
        await r.scale_old(0)
        await r.ready(n, n, "switched to the new set")


class Canary:
    name = "canary"

    async def run(self, r: Rollout) -> None:
        n = r.replicas
        await r.step()
        await r.scale_new(max(1, await r.new_running()))
        await r.gate(1)
        await r.ready(1, 0, "canary replica healthy")
        await r.step()
        await r.scale_new(n)
        await r.gate(n)
        await r.ready(n, 0, "new set healthy; retiring the previous one")
        await r.scale_old(0)
        await r.ready(n, n, "promoted")


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Rolling(), Recreate(), BlueGreen(), Canary())}
DEFAULT = "rolling"
