"""The reconciler: drives each instance's engine state toward its persisted desired state.

The API only records decisions (state `provisioning`/`starting`/`stopping`/`destroying`, a
bumped generation, a pending deployment) and wakes this loop. The drives run on
`libs.reconcile.KeyedRunner` with claims in PostgreSQL: one drive per instance across every
instances-service process, one step at a time. A step reads the row, and runs the action
`actions.next_action` names for it (each a module of `services/instances/actions/`), which
ends in a conditional state change. The periodic pass finds every unfinished instance and
deployment again, so a restarted (or another) process resumes where one stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from libs.db import Database
from libs.errors import CtrlmeshError, DeadlineExceeded, Unavailable
from libs.reconcile import Claims, KeyedRunner, every, process_owner
from services.instances import repository as repo
from services.instances.actions import ACTIONS, Action, fail, next_action
from services.instances.domain import InstancesDomain
from services.instances.executor import Executor
from services.instances.models import reconcile_claims
from services.instances.placement import Placement
from services.instances.providers import Registry
from services.instances.providers.base import Provider, ProviderError
from services.instances.repository import Instance, Scope

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
        placement: Callable[[str, str], Awaitable[str]] | None = None,
        clusters: Placement | None = None,
    ):
        """`wake`: the event the domain sets after recording a decision (it is built before the
        reconciler, which needs the domain), so the next pass runs at once. `placement`: why a
        new replica of a provider on a cluster cannot be placed now ("" when it can; see
        placement.py). `clusters`: where the engine of a cluster the registry has not learned yet
        is asked for."""
        self.placement = placement
        self.clusters = clusters
        self.db = db
        self.domain = domain
        self.outbox = domain.outbox
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
        for instance_id in todo:
            if not self.runner.busy(instance_id):
                self.runner.kick(instance_id)

    async def shutdown(self) -> None:
        await self.runner.shutdown()

    def engine(self, inst: Instance) -> Provider:
        return self.registry.get(inst.provider_name, inst.cluster_id)

    async def _know_cluster(self, inst: Instance) -> bool:
        """The engine of the instance's cluster, asked of the clusters service when not known
        yet (after a restart); False while that service does not answer."""
        if self.registry.knows(inst.cluster_id) or self.clusters is None:
            return True
        try:
            ref = await self.clusters.resolve(inst.cluster_id)
        except CtrlmeshError as err:
            log.info("instance %s waits for its cluster's engine: %s", inst.id, err)
            return False
        self.registry.learn(ref.id, ref.endpoint, default=ref.name == "main")
        return True

    async def _converge(self, instance_id: str) -> bool:
        """One step; True while the instance needs more (False: done, or waiting for the engine)."""
        async with self.db.session() as s:
            inst = await repo.get_instance(s, Scope.system(), instance_id)
            dep = await repo.in_flight_deployment(s, Scope.system(), instance_id) if inst else None
        if inst is None:
            return False
        if not await self._know_cluster(inst):
            return False  # the next pass asks again
        action = next_action(
            inst.state,
            inst.desired_state,
            inst.generation != inst.observed_generation,
            dep.state if dep is not None else None,
        )
        try:
            if action is not Action.DELETE:
                # Every other step needs the engine: one that is away fails the step (recorded
                # on the instance) before anything is decided.
                self.engine(inst)
            if action is Action.NONE:
                return False
            log.debug("instance %s: %s (%s)", inst.id, action, inst.state)
            return await ACTIONS[action](self, inst, dep)
        except (Unavailable, DeadlineExceeded) as err:
            # A peer that is down or slow (network restarting, or not yet reached by a process
            # that just restarted) fails only this step: the instance still needs work, so the
            # next pass runs it again instead of the instance ending `failed`.
            log.warning("reconciling %s waits for a peer: %s", instance_id, err.message)
            return False
        except Exception as err:
            log.warning("reconciling %s failed", instance_id, exc_info=True)
            await fail(self, inst, str(err) if isinstance(err, ProviderError) else type(err).__name__)
            return False
