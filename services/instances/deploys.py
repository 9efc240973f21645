"""Deployments and releases: the API side (deploy, rollback, cancel, reads) and the executor that
rolls a release out, run by the reconciler so a restarted service resumes it.

Strategies, written against provider groups (one service at one release):
- rolling: one new replica up and through the health gate, then one old replica stops; repeat;
- recreate: every old replica stops, then the new set starts and passes the gate;
- blue-green: the whole new set starts and passes the gate while the old set serves; then switch;
- canary: one new replica passes the gate first; then the rest of the new set; then switch.
A failed gate or a cancel removes the new group and scales the previous release back, so it keeps
serving. Each step reads the engine's actual replicas, so running a strategy again after a restart
continues where it stopped instead of starting over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from libs import ids
from libs.db import Database
from libs.errors import InvalidArgument, InvalidState, not_found
from libs.outbox import Outbox
from libs.pagination import decode_cursor, next_page, page_limit
from libs.principal import Principal
from services.instances import repository as repo
from services.instances import specs
from services.instances.domain import InstancesDomain, Page
from services.instances.health import Outcome, execute
from services.instances.providers.base import GroupSpec, Provider, ProviderError, Replica
from services.instances.repository import Row, Scope, now

log = logging.getLogger("ctrlmesh.instances.deploys")

STRATEGIES = ("rolling", "recreate", "blue-green", "canary")


class GateFailed(Exception):
    pass


class Cancelled(Exception):
    pass


async def publish_deployment(outbox: Outbox, s: Any, type_: str, dep: Row, **extra: Any) -> None:
    await outbox.publish(
        s,
        type_,
        resource="deployment",
        resource_id=dep["id"],
        tenant_id=dep["tenant_id"],
        account_id=repo.account_of(dep["instance_id"]),
        data={
            "deployment_id": dep["id"],
            "instance_id": dep["instance_id"],
            "release_id": dep["release_id"],
            "state": dep["state"],
            "strategy": dep["strategy"],
            **extra,
        },
    )


def deploy_specs(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": s["name"], "image": s["image"], "env": s["env"]} for s in services]


class DeploymentsDomain:
    def __init__(self, db: Database, instances: InstancesDomain, outbox: Outbox):
        self.db = db
        self.instances = instances
        self.outbox = outbox

    async def _publish(self, s: Any, type_: str, dep: Row, **extra: Any) -> None:
        await publish_deployment(self.outbox, s, type_, dep, **extra)

    async def _prepare(self, p: Principal, instance_id: str) -> Row:
        row = await self.instances.get(p, instance_id)
        await self.instances.writable(p, row["tenant_id"])
        return row

    @staticmethod
    def _deployable(row: Row) -> None:
        InstancesDomain._not_suspended(row)
        if row["state"] != "running":
            raise InvalidState(
                f"instance {row['id']!r} is {row['state']}; deployments need a running instance",
                details={"state": row["state"]},
            )

    async def deploy(
        self,
        p: Principal,
        instance_id: str,
        *,
        image: str,
        env: dict[str, str],
        strategy: str,
        notes: str,
        commit_sha: str,
        changes: list[dict[str, Any]],
    ) -> Row:
        await self._prepare(p, instance_id)
        strategy = strategy or "rolling"
        async with self.db.session() as s:
            row = await self.instances._load(s, p, instance_id, lock=True)
            self._deployable(row)
            if await repo.in_flight_deployment(s, instance_id):
                raise InvalidState(
                    "a deployment of this instance is already in progress", details={"state": row["state"]}
                )
            services = specs.apply_deploy(row["spec"]["services"], image, env, changes)
            t = now()
            release = {
                "id": ids.new_id("rel"),
                "tenant_id": row["tenant_id"],
                "instance_id": instance_id,
                "version": await repo.next_release_version(s, instance_id),
                "snapshot": {"services": services, "replicas": row["replicas"]},
                "notes": notes,
                "commit_sha": commit_sha,
                "active": False,
                "created_at": t,
            }
            await repo.insert_release(s, release)
            changed = {c["name"] for c in changes} | (
                {specs.main_service(services)["name"]} if image or env else set()
            )
            dep = self._new(
                row,
                release["id"],
                strategy,
                [x for x in services if x["name"] in changed],
                notes,
                commit_sha,
                p.key_id,
                rollback=False,
            )
            await repo.insert_deployment(s, dep)
            await self._publish(s, "deploy.started", dep, version=release["version"])
        await self.outbox.notify()
        self.instances.wake()
        return dep

    def _new(
        self,
        row: Row,
        release_id: str,
        strategy: str,
        services: list[dict[str, Any]],
        notes: str,
        commit_sha: str,
        initiator: str,
        *,
        rollback: bool,
    ) -> Row:
        t = now()
        live = specs.long_running(row["spec"]["services"])
        return {
            "id": ids.new_id("dep"),
            "tenant_id": row["tenant_id"],
            "instance_id": row["id"],
            "release_id": release_id,
            "previous_release_id": row["current_release"],
            "state": "pending",
            "strategy": strategy,
            "is_rollback": rollback,
            "services": deploy_specs(services),
            "progress": {
                "total_replicas": row["replicas"] * len(live),
                "ready_replicas": 0,
                "replaced_replicas": 0,
                "services": {x["name"]: "pending" for x in live},
                "message": "queued",
            },
            "notes": notes,
            "commit_sha": commit_sha,
            "error": "",
            "initiator": initiator or "system",
            "cancel_requested": False,
            "started_at": None,
            "finished_at": None,
            "created_at": t,
            "updated_at": t,
        }

    async def rollback(self, p: Principal, instance_id: str, release_id: str) -> Row:
        await self._prepare(p, instance_id)
        async with self.db.session() as s:
            row = await self.instances._load(s, p, instance_id, lock=True)
            release = await repo.get_release(s, Scope.of(p), release_id)
            if release is None or release["instance_id"] != instance_id:
                raise not_found("release", release_id)
            self._deployable(row)
            if release_id == row["current_release"]:
                raise InvalidState("the instance already runs that release", details={"state": row["state"]})
            if await repo.in_flight_deployment(s, instance_id):
                raise InvalidState(
                    "a deployment of this instance is already in progress", details={"state": row["state"]}
                )
            dep = self._new(
                row,
                release_id,
                "recreate",
                release["snapshot"]["services"],
                f"rollback to release {release['version']}",
                release["commit_sha"],
                p.key_id,
                rollback=True,
            )
            await repo.insert_deployment(s, dep)
            await self._publish(s, "deploy.started", dep, rollback=True, version=release["version"])
        await self.outbox.notify()
        self.instances.wake()
        return dep

    async def cancel(self, p: Principal, deployment_id: str) -> None:
        dep = await self.get(p, deployment_id)
        await self.instances.writable(p, dep["tenant_id"])
        async with self.db.session() as s:
            locked = await repo.get_deployment(s, Scope.of(p), deployment_id, lock=True)
            assert locked is not None
            dep = locked
            if dep["state"] == "pending":
                values = {
                    "state": "cancelled",
                    "cancel_requested": True,
                    "finished_at": now(),
                    "progress": {**dep["progress"], "message": "cancelled before it started"},
                }
                await repo.update_deployment(s, deployment_id, values)
                await self._publish(s, "deploy.cancelled", {**dep, **values})
            elif dep["state"] == "running":
                # The executor sees this between steps, stops, and restores the previous release.
                await repo.update_deployment(s, deployment_id, {"cancel_requested": True})
            else:
                raise InvalidState(
                    f"deployment {deployment_id!r} is {dep['state']}; only pending or running ones cancel",
                    details={"state": dep["state"]},
                )
        await self.outbox.notify()
        self.instances.wake()

    async def get(self, p: Principal, deployment_id: str) -> Row:
        async with self.db.session() as s:
            dep = await repo.get_deployment(s, Scope.of(p), deployment_id)
        if dep is None:
            raise not_found("deployment", deployment_id)
        return dep

    async def list_deployments(self, p: Principal, instance_id: str, cursor: str, limit: int) -> Page:
        await self.instances.get(p, instance_id)
        after, n = decode_cursor(cursor), page_limit(limit)
        async with self.db.session() as s:
            rows, total = await repo.list_deployments(s, Scope.of(p), instance_id, after, n)
        return Page(*next_page(rows, n, lambda r: r["id"]), total)

    async def get_release(self, p: Principal, release_id: str) -> Row:
        async with self.db.session() as s:
            rel = await repo.get_release(s, Scope.of(p), release_id)
        if rel is None:
            raise not_found("release", release_id)
        return rel

    async def list_releases(self, p: Principal, instance_id: str, cursor: str, limit: int) -> Page:
        await self.instances.get(p, instance_id)
        after, n = decode_cursor(cursor), page_limit(limit)
        async with self.db.session() as s:
            rows, total = await repo.list_releases(s, Scope.of(p), instance_id, after, n)
        return Page(*next_page(rows, n, lambda r: r["id"]), total)


class Executor:
    """Rolls one deployment out on the engine. Called by the reconciler with the instance locked
    to this worker; never by an RPC."""

    def __init__(
        self,
        db: Database,
        instances: InstancesDomain,
        outbox: Outbox,
        *,
        gate_timeout: float,
        settle: float,
        poll: float = 0.3,
    ):
        self.db = db
        self.instances = instances
        self.outbox = outbox
        self.gate_timeout = gate_timeout
        self.settle = settle
        self.poll = poll

    async def _save(self, dep: Row, **values: Any) -> None:
        async with self.db.session() as s:
            await repo.update_deployment(s, dep["id"], values)
        dep.update(values)

    async def _progress(self, dep: Row, **changes: Any) -> None:
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
        try:
            for svc in specs.long_running(target):
                new = GroupSpec(inst["id"], inst["tenant_id"], release["id"], svc, inst["labels"])
                old = GroupSpec(
                    inst["id"],
                    inst["tenant_id"],
                    dep["previous_release_id"],
                    current.get(svc["name"], svc),
                    inst["labels"],
                )
                await self._progress(
                    dep,
                    services={**dep["progress"]["services"], svc["name"]: "running"},
                    message=f"rolling out {svc['name']} ({dep['strategy']})",
                )
                await self._strategy(dep, provider, new, old, n, checks if svc["name"] == main else [])
                await self._progress(dep, services={**dep["progress"]["services"], svc["name"]: "succeeded"})
        except Cancelled:
            await self._restore(dep, provider, inst, target)
            await self._finish(dep, "cancelled", "", inst)
            return
        except (GateFailed, ProviderError) as err:
            log.info("deployment %s failed: %s", dep["id"], err)
            await self._progress(
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
        strategy = dep["strategy"]
        base_ready = dep["progress"].get("ready_replicas", 0)

        async def ready(count: int, replaced: int, msg: str) -> None:
            await self._progress(
                dep, ready_replicas=base_ready + count, replaced_replicas=base_ready + replaced, message=msg
            )

        if n == 0:
            await provider.scale_group(old, 0)
            return
        if strategy == "rolling":
            have = len(await self._group(provider, new))
            for i in range(max(1, have), n + 1):
                await self._step(dep)
                await provider.scale_group(new, i)
                await self._gate(dep, provider, new, i, checks)
                await provider.scale_group(old, n - i)
                await ready(i, i, f"{i}/{n} replicas of {new.service_name} replaced")
        elif strategy == "recreate":
            await self._step(dep)
            await provider.scale_group(old, 0)
            await ready(0, n, "previous replicas stopped")
            await provider.scale_group(new, n)
            await self._gate(dep, provider, new, n, checks)
            await ready(n, n, f"{n}/{n} new replicas healthy")
        elif strategy == "blue-green":
            await self._step(dep)
            await provider.scale_group(new, n)
            await self._gate(dep, provider, new, n, checks)
            await ready(n, 0, "new set healthy; switching")
            await self._step(dep)
            await provider.scale_group(old, 0)
            await ready(n, n, "switched to the new set")
        elif strategy == "canary":
            await self._step(dep)
            await provider.scale_group(new, max(1, len(await self._group(provider, new))))
            await self._gate(dep, provider, new, 1, checks)
            await ready(1, 0, "canary replica healthy")
            await self._step(dep)
            await provider.scale_group(new, n)
            await self._gate(dep, provider, new, n, checks)
            await ready(n, 0, "new set healthy; retiring the previous one")
            await provider.scale_group(old, 0)
            await ready(n, n, "promoted")
        else:
            raise GateFailed(f"unknown strategy {strategy!r}")

    async def _step(self, dep: Row) -> None:
        if await self._cancelled(dep):
            raise Cancelled()

    @staticmethod
    async def _group(provider: Provider, g: GroupSpec) -> list[Replica]:
        return [
            r
            for r in await provider.replicas(g.instance_id)
            if r.service == g.service_name and r.release_id == g.release_id
        ]

    async def _gate(self, dep: Row, provider: Provider, g: GroupSpec, count: int, checks: list[Row]) -> None:
        """Wait until `count` replicas of the group run and pass every check (or, without checks,
        keep running for the settle time); a replica that exits fails the gate at once."""
        deadline = time.monotonic() + self.gate_timeout
        passed: set[int] = set()
        first_running: dict[int, float] = {}
        last = "no replica running yet"
        while True:
            if await self._cancelled(dep):
                raise Cancelled()
            reps = [r for r in await self._group(provider, g) if r.index < count]
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
        for svc in specs.long_running(inst["spec"]["services"]):
            old = GroupSpec(inst["id"], inst["tenant_id"], dep["previous_release_id"], svc, inst["labels"])
            try:
                await provider.scale_group(old, inst["replicas"])
            except ProviderError:
                log.warning("could not restore %s of %s", svc["name"], inst["id"], exc_info=True)
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
            await repo.update_deployment(s, dep["id"], values)
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
            await repo.update_instance(s, inst["id"], values)
            await repo.activate_release(s, inst["id"], release["id"])
            done = {
                "state": "succeeded",
                "finished_at": now(),
                "progress": {**dep["progress"], "message": "succeeded"},
            }
            await repo.update_deployment(s, dep["id"], done)
            dep.update(done)
            if dep["is_rollback"]:
                left = await repo.last_succeeded_for_release(s, inst["id"], dep["previous_release_id"])
                if left is not None and left["id"] != dep["id"]:
                    await repo.update_deployment(s, left["id"], {"state": "rolled_back"})
                await publish_deployment(
                    self.outbox, s, "deploy.rolled_back", dep, version=release["version"]
                )
            else:
                await publish_deployment(self.outbox, s, "deploy.succeeded", dep, version=release["version"])
        await self.outbox.notify()


def validate_strategy(strategy: str) -> None:
    if strategy and strategy not in STRATEGIES:
        raise InvalidArgument(
            f"unknown strategy {strategy!r}", fields={"strategy": "rolling, recreate, blue-green or canary"}
        )
