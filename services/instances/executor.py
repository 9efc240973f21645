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
from typing import Any

from libs.db import Database
from libs.outbox import Outbox
from services.instances import repository as repo
from services.instances import specs
from services.instances.deployments import publish_deployment
from services.instances.endpoints import endpoints_of
from services.instances.health import Outcome, execute
from services.instances.providers.base import NO_SECRETS, GroupSpec, Provider, ProviderError, Replica
from services.instances.repository import Row, Scope, now
from services.instances.secrets_client import SecretsClient
from services.instances.strategies import STRATEGIES

log = logging.getLogger("ctrlmesh.instances.deploys")


class GateFailed(Exception):
    pass


class Cancelled(Exception):
    pass


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
        poll: float = 0.3,
        secrets: SecretsClient | None = None,
    ):
        self.db = db
        self.outbox = outbox
        self.gate_timeout = gate_timeout
        self.settle = settle
        self.poll = poll
        self.secrets = secrets

    async def groups(
        self, inst: Row, release_id: str, services: list[dict[str, Any]], *, current: bool = False
    ) -> list[GroupSpec]:
        """The one place a rollout builds its provider groups: one per service of `services` at
        `release_id`, each with what the release runs with besides its spec (its secrets; see
        secrets_client.py for which versions, `current` taking the latest)."""
        secrets = NO_SECRETS
        if self.secrets is not None:
            secrets = await self.secrets.for_release(
                inst["tenant_id"], inst["id"], release_id, current=current
            )
        return [
            GroupSpec(inst["id"], inst["tenant_id"], release_id, svc, inst["labels"], secrets)
            for svc in services
        ]

    async def _save(self, dep: Row, **values: Any) -> None:
        async with self.db.session() as s:
            await repo.update_deployment(s, Scope.system(), dep["id"], values)
        dep.update(values)

    async def progress(self, dep: Row, **changes: Any) -> None:
        await self._save(dep, progress={**dep["progress"], **changes})

    async def _cancelled(self, dep: Row) -> bool:
        async with self.db.session() as s:
            fresh = await repo.get_deployment(s, Scope.system(), dep["id"])
        return bool(fresh and fresh["cancel_requested"])

    async def run(self, inst: Row, dep: Row, provider: Provider) -> None:
        if dep["cancel_requested"] and dep["state"] == "pending":
            await self._finish(dep, "cancelled", "", inst)
            return
        if dep["state"] == "pending":
            await self._save(dep, state="running", started_at=now())
            async with self.db.session() as s:
                await publish_deployment(self.outbox, s, "deploy.running", dep)
            await self.outbox.notify()
        async with self.db.session() as s:
            release = await repo.get_release(s, Scope.system(), dep["release_id"])
            checks = [c for c in await repo.list_checks(s, Scope.system(), inst["id"]) if c["enabled"]]
        assert release is not None
        current = {x["name"]: x for x in inst["spec"]["services"]}
        # A release brings images, env and ports; resources and replicas stay what they are now.
        target = [
            dict(x, resources=current.get(x["name"], x)["resources"]) for x in release["snapshot"]["services"]
        ]
        n = inst["replicas"]
        main = specs.main_service(target)["name"]
        live = specs.long_running(target)
        try:
            news = await self.groups(inst, release["id"], live)
            olds = await self.groups(
                inst, dep["previous_release_id"], [current.get(x["name"], x) for x in live]
            )
            for svc, new, old in zip(live, news, olds, strict=True):
                await self.progress(
                    dep,
                    services={**dep["progress"]["services"], svc["name"]: "running"},
                    message=f"rolling out {svc['name']} ({dep['strategy']})",
                )
                await self._strategy(dep, provider, new, old, n, checks if svc["name"] == main else [])
                await self.progress(dep, services={**dep["progress"]["services"], svc["name"]: "succeeded"})
        except Cancelled:
            await self._restore(dep, provider, inst, target)
            await self._finish(dep, "cancelled", "", inst)
            return
        except (GateFailed, ProviderError) as err:
            log.info("deployment %s failed: %s", dep["id"], err)
            await self.progress(
                dep,
                services={
                    k: ("failed" if v == "running" else v) for k, v in dep["progress"]["services"].items()
                },
            )
            await self._restore(dep, provider, inst, target)
            await self._finish(dep, "failed", str(err), inst)
            return
        await self._succeed(dep, provider, inst, release, target)

    # -- strategies --------------------------------------------------------------------------

    async def _strategy(
        self, dep: Row, provider: Provider, new: GroupSpec, old: GroupSpec, n: int, checks: list[Row]
    ) -> None:
        if n == 0:
            await provider.scale_group(old, 0)
            return
        strategy = STRATEGIES.get(dep["strategy"])
        if strategy is None:
            raise GateFailed(f"unknown strategy {dep['strategy']!r}")
        await strategy.run(_Rollout(self, dep, provider, new, old, n, checks))

    async def check_cancel(self, dep: Row) -> None:
        if await self._cancelled(dep):
            raise Cancelled()

    @staticmethod
    async def group_replicas(provider: Provider, g: GroupSpec) -> list[Replica]:
        return [
            r
            for r in await provider.replicas(g.instance_id)
            if r.service == g.service_name and r.release_id == g.release_id
        ]

    async def gate(self, dep: Row, provider: Provider, g: GroupSpec, count: int, checks: list[Row]) -> None:
        """Wait until `count` replicas of the group run and pass every check (or, without checks,
        keep running for the settle time); a replica that exits fails the gate at once."""
        deadline = time.monotonic() + self.gate_timeout
        passed: set[int] = set()
        first_running: dict[int, float] = {}
        last = "no replica running yet"
        while True:
            if await self._cancelled(dep):
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
                    last = f"check {bad[0][0]['name']!r}: {bad[0][1].message}"
            if len(passed) >= count:
                return
            if time.monotonic() > deadline:
                raise GateFailed(
                    f"health gate: {count - len(passed)} replica(s) of {g.service_name} not healthy within "
                    f"{self.gate_timeout:g}s ({last})"
                )
            await asyncio.sleep(self.poll)

    # -- endings -----------------------------------------------------------------------------

    async def _restore(self, dep: Row, provider: Provider, inst: Row, target: list[dict[str, Any]]) -> None:
        """Put the previous release back to full strength and drop the new group."""
        try:
            olds = await self.groups(
                inst, dep["previous_release_id"], specs.long_running(inst["spec"]["services"])
            )
        except ProviderError:
            log.warning("could not resolve the previous release of %s", inst["id"], exc_info=True)
            olds = []
        for old in olds:
            try:
                await provider.scale_group(old, inst["replicas"])
            except ProviderError:
                log.warning("could not restore %s of %s", old.service_name, inst["id"], exc_info=True)
        for svc in target:
            try:
                await provider.remove_group(inst["id"], svc["name"], dep["release_id"])
            except ProviderError:
                log.warning("could not remove the new group of %s", inst["id"], exc_info=True)

    async def _finish(self, dep: Row, state: str, error: str, inst: Row) -> None:
        values = {
            "state": state,
            "error": error,
            "finished_at": now(),
            "progress": {**dep["progress"], "message": error or state},
        }
        async with self.db.session() as s:
            await repo.update_deployment(s, Scope.system(), dep["id"], values)
            dep.update(values)
            kind = {"failed": "deploy.failed", "cancelled": "deploy.cancelled"}[state]
            await publish_deployment(self.outbox, s, kind, dep, error=error)
        await self.outbox.notify()

    async def _succeed(
        self, dep: Row, provider: Provider, inst: Row, release: Row, target: list[dict[str, Any]]
    ) -> None:
        # Anything not of the new release is retired (swarm keeps 0-replica services otherwise).
        for r in await provider.replicas(inst["id"]):
            if r.release_id != release["id"]:
                await provider.remove_group(inst["id"], r.service, r.release_id)
        for svc in specs.long_running(inst["spec"]["services"]):
            await provider.remove_group(inst["id"], svc["name"], dep["previous_release_id"])
        main = specs.main_service(target)
        reps = await provider.replicas(inst["id"])
        async with self.db.session() as s:
            row = await repo.get_instance(s, Scope.system(), inst["id"], lock=True)
            if row is None:
                return
            values = {
                "spec": {**row["spec"], "services": target},
                "image": main["image"],
                "current_release": release["id"],
                **specs.per_replica(target),
            }
            # In the same commit as the new release: a reader that sees the deployment succeeded
            # must not be handed the previous release's endpoints.
            values["endpoints"] = endpoints_of({**row, **values}, reps)
            await repo.update_instance(s, Scope.system(), inst["id"], values)
            await repo.activate_release(s, Scope.system(), inst["id"], release["id"])
            done = {
                "state": "succeeded",
                "finished_at": now(),
                "progress": {**dep["progress"], "message": "succeeded"},
            }
            await repo.update_deployment(s, Scope.system(), dep["id"], done)
            dep.update(done)
            if dep["is_rollback"]:
                left = await repo.last_succeeded_for_release(
                    s, Scope.system(), inst["id"], dep["previous_release_id"]
                )
                if left is not None and left["id"] != dep["id"]:
                    await repo.update_deployment(s, Scope.system(), left["id"], {"state": "rolled_back"})
                await publish_deployment(
                    self.outbox, s, "deploy.rolled_back", dep, version=release["version"]
                )
            else:
                await publish_deployment(self.outbox, s, "deploy.succeeded", dep, version=release["version"])
        await self.outbox.notify()


class _Rollout:
    """One service of one deployment, as a strategy sees it."""

    def __init__(
        self,
        ex: Executor,
        dep: Row,
        provider: Provider,
        new: GroupSpec,
        old: GroupSpec,
        n: int,
        checks: list[Row],
    ):
        self._ex, self._dep, self._provider = ex, dep, provider
        self._new, self._old, self._n, self._checks = new, old, n, checks
        self._base = dep["progress"].get("ready_replicas", 0)

    @property
    def service(self) -> str:
        return self._new.service_name

    @property
    def replicas(self) -> int:
        return self._n

    async def step(self) -> None:
        await self._ex.check_cancel(self._dep)

    async def new_running(self) -> int:
        return len(await self._ex.group_replicas(self._provider, self._new))

    async def scale_new(self, count: int) -> None:
        await self._provider.scale_group(self._new, count)

    async def scale_old(self, count: int) -> None:
        await self._provider.scale_group(self._old, count)

    async def gate(self, count: int) -> None:
        await self._ex.gate(self._dep, self._provider, self._new, count, self._checks)

    async def ready(self, ready: int, replaced: int, message: str) -> None:
        await self._ex.progress(
            self._dep,
            ready_replicas=self._base + ready,
            replaced_replicas=self._base + replaced,
            message=message,
        )
