"""The executor: rolls one deployment out on the engine, run by the reconciler so a restarted
service resumes it. The order of the steps is the strategy's (strategies.py); this module runs
them against provider groups (one service at one release), holds the health gate, and ends the
deployment. A failed gate or a cancel removes the new group and scales the previous release back,
so it keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from libs.db import Database
from libs.outbox import Outbox
from services.instances import repository as repo
from services.instances import specs
from services.instances.deployments import publish_deployment
from services.instances.endpoints import endpoints_of
from services.instances.health import Outcome, execute
from services.instances.providers.base import NO_SECRETS, GroupSpec, Provider, ProviderError, Replica
from services.instances.repository import Deployment, HealthCheck, Instance, Release, Scope, Values, now
from services.instances.secrets_client import SecretsClient
from services.instances.strategies import STRATEGIES

log = logging.getLogger("ctrlmesh.instances.deploys")


class Run:
    """The deployment being rolled out, as last written: each change is saved, then read back
    from here (the row is frozen; the run moves from one row to the next)."""

    def __init__(self, db: Database, row: Deployment):
        self._db = db
        self.row = row

    async def save(self, **values: Any) -> None:
        async with self._db.session() as s:
            await repo.update_deployment(s, Scope.system(), self.row.id, values)
        self.row = replace(self.row, **values)

    async def progress_to(self, **changes: Any) -> None:
        await self.save(progress={**self.row.progress, **changes})


class GateFailed(Exception):
    pass


class Cancelled(Exception):
    pass


# What a rollout adds to the env of the services it starts (the OTLP endpoint and a fresh
# ingest token): (instance, release id, services) → the services as started. The instance's spec
# keeps the services without it, so the token is never stored or shown in clear.
RolloutEnv = Callable[[Instance, str, list[dict[str, Any]]], Awaitable[list[dict[str, Any]]]]


class Executor:
    """Rolls one deployment out on the engine. Called by the reconciler with the instance locked
    to this worker; never by an RPC."""

    def __init__(
        self,
        db: Database,
        outbox: Outbox,
        *,
        gate_timeout: float,
        settle: float,
        drain: float = 0.0,
        poll: float = 0.3,
        secrets: SecretsClient | None = None,
        rollout_env: RolloutEnv | None = None,
    ):
        self.rollout_env = rollout_env
        self.db = db
        self.outbox = outbox
        self.gate_timeout = gate_timeout
        self.settle = settle
        self.drain = drain
        self.poll = poll
        self.secrets = secrets

    async def groups(
        self,
        inst: Instance,
        release_id: str,
        services: list[dict[str, Any]],
        *,
        current: bool = False,
        starting: bool = True,
    ) -> list[GroupSpec]:
        """The one place a rollout builds its provider groups: one per service of `services` at
        `release_id`, each with what the release runs with besides its spec (its secrets; see
        secrets_client.py for which versions, `current` taking the latest) and, for groups about
        to start (`starting`), the environment every rollout adds (the OTLP endpoint and token)."""
        if starting and self.rollout_env is not None:
            services = await self.rollout_env(inst, release_id, services)
        secrets = NO_SECRETS
        if self.secrets is not None:
            secrets = await self.secrets.for_release(inst.tenant_id, inst.id, release_id, current=current)
        return [GroupSpec(inst.id, inst.tenant_id, release_id, svc, inst.labels, secrets) for svc in services]

    async def _cancelled(self, run: Run) -> bool:
        async with self.db.session() as s:
            fresh = await repo.get_deployment(s, Scope.system(), run.row.id)
        return bool(fresh and fresh.cancel_requested)

    async def run(self, inst: Instance, deployment: Deployment, provider: Provider) -> None:
        run = Run(self.db, deployment)
        if run.row.cancel_requested and run.row.state == "pending":
            await self._finish(run, "cancelled", "")
            return
        if run.row.state == "pending":
            await run.save(state="running", started_at=now())
            async with self.outbox.session() as s:
                await publish_deployment(self.outbox, s, "deploy.running", run.row)
        async with self.db.session() as s:
            release = await repo.get_release(s, Scope.system(), run.row.release_id)
            checks = [c for c in await repo.list_checks(s, Scope.system(), inst.id) if c.enabled]
        assert release is not None
        current = {x["name"]: x for x in inst.spec["services"]}
        # A release brings images, env and ports; resources and replicas stay what they are now.
        target = [
            dict(x, resources=current.get(x["name"], x)["resources"]) for x in release.snapshot["services"]
        ]
        n = inst.replicas
        main = specs.main_service(target)["name"]
        live = specs.long_running(target)
        try:
            news = await self.groups(inst, release.id, live)
            olds = await self.groups(
                inst, run.row.previous_release_id, [current.get(x["name"], x) for x in live], starting=False
            )
            for svc, new, old in zip(live, news, olds, strict=True):
                await run.progress_to(
                    services={**run.row.progress["services"], svc["name"]: "running"},
                    message=f"rolling out {svc['name']} ({run.row.strategy})",
                )
                await _Rollout(self, run, provider, new, old, n, checks if svc["name"] == main else []).run()
                await run.progress_to(services={**run.row.progress["services"], svc["name"]: "succeeded"})
        except Cancelled:
            await self._restore(run, provider, inst, target)
            await self._finish(run, "cancelled", "")
            return
        except (GateFailed, ProviderError) as err:
            log.info("deployment %s failed: %s", run.row.id, err)
            await run.progress_to(
                services={
                    k: ("failed" if v == "running" else v) for k, v in run.row.progress["services"].items()
                },
            )
            await self._restore(run, provider, inst, target)
            await self._finish(run, "failed", str(err))
            return
        await self._succeed(run, provider, inst, release, target)

    # -- what a rollout asks of the engine ----------------------------------------------------

    async def check_cancel(self, run: Run) -> None:
        if await self._cancelled(run):
            raise Cancelled()

    @staticmethod
    async def group_replicas(provider: Provider, g: GroupSpec) -> list[Replica]:
        return [
            r
            for r in await provider.replicas(g.instance_id)
            if r.service == g.service_name and r.release_id == g.release_id
        ]

    async def gate(
        self, run: Run, provider: Provider, g: GroupSpec, count: int, checks: list[HealthCheck]
    ) -> None:
        """Wait until `count` replicas of the group run and pass every check (or, without checks,
        keep running for the settle time); a replica that exits fails the gate at once."""
        deadline = time.monotonic() + self.gate_timeout
        passed: set[int] = set()
        first_running: dict[int, float] = {}
        last = "no replica running yet"
        while True:
            if await self._cancelled(run):
                raise Cancelled()
            reps = [r for r in await self.group_replicas(provider, g) if r.index < count]
            for r in reps:
                if r.state in ("exited", "dead", "failed", "rejected"):
                    raise GateFailed(
                        f"replica {r.index} of {g.service_name} stopped ({r.state}) before becoming healthy"
                    )
                if r.index in passed or not r.running:
                    continue
                first_running.setdefault(r.index, time.monotonic())
                if not checks:
                    if time.monotonic() - first_running[r.index] >= self.settle:
                        passed.add(r.index)
                    continue
                outcomes: list[Outcome] = [await execute(c, r, provider) for c in checks]
                bad = [(c, o) for c, o in zip(checks, outcomes, strict=True) if o.status != "healthy"]
                if not bad:
                    passed.add(r.index)
                else:
                    last = f"check {bad[0][0].name!r}: {bad[0][1].message}"
            if len(passed) >= count:
                return
            if time.monotonic() > deadline:
                raise GateFailed(
                    f"health gate: {count - len(passed)} replica(s) of {g.service_name} not healthy within "
                    f"{self.gate_timeout:g}s ({last})"
                )
            await asyncio.sleep(self.poll)

    # -- endings -----------------------------------------------------------------------------

    async def _restore(
        self, run: Run, provider: Provider, inst: Instance, target: list[dict[str, Any]]
    ) -> None:
        """Put the previous release back to full strength and drop the new group."""
        try:
            olds = await self.groups(
                inst, run.row.previous_release_id, specs.long_running(inst.spec["services"])
            )
        except ProviderError:
            log.warning("could not resolve the previous release of %s", inst.id, exc_info=True)
            olds = []
        for old in olds:
            try:
                await provider.scale_group(old, inst.replicas)
            except ProviderError:
                log.warning("could not restore %s of %s", old.service_name, inst.id, exc_info=True)
        for svc in target:
            try:
                await provider.remove_group(inst.id, svc["name"], run.row.release_id)
            except ProviderError:
                log.warning("could not remove the new group of %s", inst.id, exc_info=True)

    async def _finish(self, run: Run, state: str, error: str) -> None:
        values: Values = {
            "state": state,
            "error": error,
            "finished_at": now(),
            "progress": {**run.row.progress, "message": error or state},
        }
        async with self.outbox.session() as s:
            await repo.update_deployment(s, Scope.system(), run.row.id, values)
            run.row = replace(run.row, **values)
            kind = {"failed": "deploy.failed", "cancelled": "deploy.cancelled"}[state]
            await publish_deployment(self.outbox, s, kind, run.row, error=error)

    async def _succeed(
        self, run: Run, provider: Provider, inst: Instance, release: Release, target: list[dict[str, Any]]
    ) -> None:
        # Anything not of the new release is retired (swarm keeps 0-replica services otherwise).
        for r in await provider.replicas(inst.id):
            if r.release_id != release.id:
                await provider.remove_group(inst.id, r.service, r.release_id)
        for svc in specs.long_running(inst.spec["services"]):
            await provider.remove_group(inst.id, svc["name"], run.row.previous_release_id)
        main = specs.main_service(target)
        reps = await provider.replicas(inst.id)
        async with self.outbox.session() as s:
            row = await repo.get_instance(s, Scope.system(), inst.id, lock=True)
            if row is None:
                return
            values: Values = {
                "spec": {**row.spec, "services": target},
                "image": main["image"],
                "current_release": release.id,
                **specs.per_replica(target),
            }
            # In the same commit as the new release: a reader that sees the deployment succeeded
            # must not be handed the previous release's endpoints.
            values["endpoints"] = endpoints_of(replace(row, **values), reps)
            await repo.update_instance(s, Scope.system(), inst.id, values)
            await repo.activate_release(s, Scope.system(), inst.id, release.id)
            done: Values = {
                "state": "succeeded",
                "finished_at": now(),
                "progress": {**run.row.progress, "message": "succeeded"},
            }
            await repo.update_deployment(s, Scope.system(), run.row.id, done)
            run.row = replace(run.row, **done)
            if run.row.is_rollback:
                left = await repo.last_succeeded_for_release(
                    s, Scope.system(), inst.id, run.row.previous_release_id
                )
                if left is not None and left.id != run.row.id:
                    await repo.update_deployment(s, Scope.system(), left.id, {"state": "rolled_back"})
            kind = "deploy.rolled_back" if run.row.is_rollback else "deploy.succeeded"
            await publish_deployment(self.outbox, s, kind, run.row, version=release.version)


class _Rollout:
    """One service of one deployment, as a strategy sees it."""

    def __init__(
        self,
        ex: Executor,
        run: Run,
        provider: Provider,
        new: GroupSpec,
        old: GroupSpec,
        n: int,
        checks: list[HealthCheck],
    ):
        self._ex, self._run, self._provider = ex, run, provider
        self._new, self._old, self._n, self._checks = new, old, n, checks
        self._base = run.row.progress.get("ready_replicas", 0)

    async def run(self) -> None:
        """The deployment's strategy, over this service's groups."""
        if self._n == 0:
            await self.scale_old(0)
            return
        strategy = STRATEGIES.get(self._run.row.strategy)
        if strategy is None:
            raise GateFailed(f"unknown strategy {self._run.row.strategy!r}")
        await strategy.run(self)

    @property
    def service(self) -> str:
        return self._new.service_name

    @property
    def replicas(self) -> int:
        return self._n

    async def step(self) -> None:
        await self._ex.check_cancel(self._run)

    async def new_running(self) -> int:
        return len(await self._ex.group_replicas(self._provider, self._new))

    async def scale_new(self, count: int) -> None:
        await self._provider.scale_group(self._new, count)

    async def scale_old(self, count: int) -> None:
        """Scale the previous release down to `count`; the replicas about to stop first leave the
        ingress (`progress.leaving`, which ListReplicaEndpoints leaves out) and drain."""
        leaving = [r for r in await self._ex.group_replicas(self._provider, self._old) if r.index >= count]
        if leaving and self._ex.drain > 0:
            await self._run.progress_to(leaving=[r.slot for r in leaving])
            await asyncio.sleep(self._ex.drain)
        await self._provider.scale_group(self._old, count)
        if self._run.row.progress.get("leaving"):
            await self._run.progress_to(leaving=[])

    async def gate(self, count: int) -> None:
        await self._ex.gate(self._run, self._provider, self._new, count, self._checks)

    async def ready(self, ready: int, replaced: int, message: str) -> None:
        await self._run.progress_to(
            ready_replicas=self._base + ready,
            replaced_replicas=self._base + replaced,
            message=message,
        )
