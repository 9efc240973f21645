"""The reconciler: drives each instance's engine state toward its persisted desired state.

The API only records decisions (state `provisioning`/`starting`/`stopping`/`destroying`, a
bumped generation, a pending deployment) and wakes this loop. The drives run on
`libs.reconcile.KeyedRunner` with claims in PostgreSQL: one drive per instance across every
instances-service process, one step at a time, each step a conditional state change. The
periodic pass finds every unfinished instance and deployment again, so a restarted (or another)
process resumes where one stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from libs.db import Database
from libs.reconcile import Claims, KeyedRunner, every, process_owner
from services.instances import repository as repo
from services.instances import specs
from services.instances.domain import InstancesDomain
from services.instances.endpoints import endpoints_of
from services.instances.executor import Executor
from services.instances.models import reconcile_claims
from services.instances.providers import Registry
from services.instances.providers.base import Provider, ProviderError, Replica
from services.instances.repository import Row, Scope

log = logging.getLogger("ctrlmesh.instances.reconciler")


class Reconciler:
    def __init__(
        self,
        db: Database,
        domain: InstancesDomain,
        registry: Registry,
        executor: Executor,
        *,
        start_timeout: float = 60.0,
        interval: float = 1.0,
        owner: str = "",
        wake: asyncio.Event | None = None,
        placement: Callable[[str], Awaitable[str]] | None = None,
    ):
        """`wake`: the event the domain sets after recording a decision (it is built before the
        reconciler, which needs the domain), so the next pass runs at once. `placement`: why a
        new instance on a provider cannot be placed now ("" when it can; see placement.py)."""
        self.placement = placement
        self.db = db
        self.domain = domain
        self.registry = registry
        self.executor = executor
        self.start_timeout = start_timeout
        self.interval = interval
        self._event = wake or asyncio.Event()
        claims = Claims(db, reconcile_claims, owner or process_owner("instances"))
        # At most 50 steps per drive: an instance that keeps needing work yields to the others
        # and is picked up again by the next pass.
        self.runner: KeyedRunner[str] = KeyedRunner(
            "instance reconcile", self._converge, claims=claims, max_steps=50
        )

    def wake(self) -> None:
        self._event.set()

    async def run(self) -> None:
        await every("instance reconcile", self.interval, self._pass, first=0, jitter=0, wake=self._event)

    async def _pass(self) -> None:
        async with self.db.session() as s:
            todo = await repo.instances_needing_work(s)
        for row in todo:
            if not self.runner.busy(row["id"]):
                self.runner.kick(row["id"])

    async def shutdown(self) -> None:
        await self.runner.shutdown()

    async def _converge(self, instance_id: str) -> bool:
        """One step; True while the instance needs more (False: done, or waiting for the engine)."""
        async with self.db.session() as s:
            row = await repo.get_instance(s, Scope.system(), instance_id)
            dep = await repo.in_flight_deployment(s, Scope.system(), instance_id) if row else None
        if row is None:
            return False
        try:
            return await self._step(row, dep)
        except Exception as err:
            log.warning("reconciling %s failed", instance_id, exc_info=True)
            await self._fail(row, str(err) if isinstance(err, ProviderError) else type(err).__name__)
            return False

    async def _fail(self, row: Row, error: str) -> None:
        async with self.db.session() as s:
            fresh = await repo.get_instance(s, Scope.system(), row["id"], lock=True)
            if fresh is None or fresh["state"] == "failed":
                return
            if specs.can_transition(fresh["state"], "failed"):
                await self.domain.transition(s, fresh, "failed", last_error=error[:2000])
            elif fresh["state"] == "running":
                await repo.update_instance(
                    s,
                    Scope.system(),
                    fresh["id"],
                    {"last_error": error[:2000], "observed_generation": fresh["generation"]},
                )
        await self.domain.outbox.notify()

    async def _set(self, row: Row, state: str, **values: Any) -> bool:
        async with self.db.session() as s:
            ok = await self.domain.transition(s, row, state, **values)
        await self.domain.outbox.notify()
        return ok

    async def _bring_up(self, provider: Provider, row: Row) -> list[Replica]:
        """Every group of the current release at full strength and running; returns replicas.
        A (re)start runs with the current secret versions; a scale keeps the release's."""
        # Leftovers of other releases (an interrupted rollout) must not serve beside this one.
        for r in await provider.replicas(row["id"]):
            if r.release_id != row["current_release"]:
                await provider.remove_group(row["id"], r.service, r.release_id)
        groups = await self.executor.groups(
            row,
            row["current_release"],
            specs.long_running(row["spec"]["services"]),
            current=row["state"] == "starting",
        )
        for g in groups:
            await provider.scale_group(g, row["replicas"])
            await provider.update_resources(g)
        deadline = time.monotonic() + self.start_timeout
        want = row["replicas"] * len(groups)
        while True:
            reps = [r for r in await provider.replicas(row["id"]) if r.release_id == row["current_release"]]
            bad = [r for r in reps if r.state in ("exited", "dead", "failed", "rejected")]
            if bad:
                raise ProviderError(f"replica {bad[0].index} of {bad[0].service} stopped ({bad[0].state})")
            if sum(r.running for r in reps) >= want:
                return reps
            if time.monotonic() > deadline:
                raise ProviderError(f"replicas did not start within {self.start_timeout:g}s")
            await asyncio.sleep(0.2)

    async def _step(self, row: Row, dep: Row | None) -> bool:
        state = row["state"]
        if state == "destroying":
            return await self._destroy(row)
        provider = self.registry.get(row["provider_name"])
        if dep is not None and state == "running" and row["desired_state"] == "running":
            await self.executor.run(row, dep, provider)
            await self._refresh_endpoints(provider, row["id"])
            return True
        if dep is not None and dep["state"] in ("pending", "running"):
            # The instance is leaving `running`: the rollout cannot go on.
            await self._abandon(dep)
            return True
        if state == "provisioning":
            reason = await self.placement(row["provider_name"]) if self.placement else ""
            if reason:
                if row["last_error"] != reason:
                    async with self.db.session() as s:
                        await repo.update_instance(s, Scope.system(), row["id"], {"last_error": reason})
                return False  # the periodic pass asks again
            if not await self._set(row, "starting"):
                return True
            row = {**row, "state": "starting"}
            state = "starting"
        if state == "starting":
            reps = await self._bring_up(provider, row)
            return await self._reach_running(row, reps)
        if state == "stopping":
            await provider.stop(row["id"])
            return await self._stopped(row["id"])
        if state == "running" and row["desired_state"] != "running":
            return await self._set(row, "stopping")
        if state == "running" and row["generation"] != row["observed_generation"]:
            reps = await self._bring_up(provider, row)
            async with self.db.session() as s:
                await repo.update_instance(
                    s,
                    Scope.system(),
                    row["id"],
                    {"observed_generation": row["generation"], "endpoints": endpoints_of(row, reps)},
                )
            return True
        return False

    async def _stopped(self, instance_id: str) -> bool:
        """After the engine stopped an instance: `stopped`, or up again when its desired state is
        `running` (a restart, or an unsuspend or start that came while it stopped). Decided on the
        row as it is now, under its lock: the desired state read before the stop may be stale,
        and both transitions commit together, so a crash between them cannot strand the instance
        stopped while it should run."""
        async with self.db.session() as s:
            fresh = await repo.get_instance(s, Scope.system(), instance_id, lock=True)
            if fresh is None or fresh["state"] != "stopping":
                return True
            await self.domain.transition(s, fresh, "stopped", endpoints=[])
            again = fresh["desired_state"] == "running"
            if again:
                await self.domain.transition(s, {**fresh, "state": "stopped", "endpoints": []}, "starting")
        await self.domain.outbox.notify()
        return again

    async def _reach_running(self, row: Row, reps: list[Replica]) -> bool:
        async with self.db.session() as s:
            fresh = await repo.get_instance(s, Scope.system(), row["id"], lock=True)
            if fresh is None or fresh["state"] != "starting":
                return True
            await self.domain.transition(
                s,
                fresh,
                "running",
                endpoints=endpoints_of(fresh, reps),
                last_error="",
                observed_generation=fresh["generation"],
            )
        await self.domain.outbox.notify()
        return True

    async def _refresh_endpoints(self, provider: Provider, instance_id: str) -> None:
        async with self.db.session() as s:
            row = await repo.get_instance(s, Scope.system(), instance_id)
        if row is None:
            return
        reps = await provider.replicas(instance_id)
        async with self.db.session() as s:
            await repo.update_instance(s, Scope.system(), instance_id, {"endpoints": endpoints_of(row, reps)})

    async def _abandon(self, dep: Row) -> None:
        async with self.db.session() as s:
            await repo.update_deployment(
                s,
                Scope.system(),
                dep["id"],
                {
                    "state": "cancelled",
                    "finished_at": repo.now(),
                    "error": "the instance stopped or was deleted",
                },
            )

    async def _destroy(self, row: Row) -> bool:
        if self.registry.has(row["provider_name"]):
            removed = await self.registry.get(row["provider_name"]).remove_all(row["id"])
            # A second look: a replica being created while we removed would be left behind.
            if removed:
                await self.registry.get(row["provider_name"]).remove_all(row["id"])
            warning = ""
        elif row["provider_name"] in self.registry.configured:
            return False  # its engine is away; keep `destroying` and try again later
        else:
            warning = (
                f"provider {row['provider_name']!r} is no longer configured; engine resources not removed"
            )
        async with self.db.session() as s:
            await repo.delete_instance(s, Scope.system(), row["id"])
            await self.domain.publish(
                s,
                "instance.deleted",
                {**row, "state": "destroyed"},
                **({"warning": warning} if warning else {}),
            )
        await self.domain.outbox.notify()
        return False
