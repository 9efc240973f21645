"""Deployments and releases, the API side: deploy, rollback, cancel and the reads. Each change is
recorded as a pending deployment and the reconciler is woken; the executor (executor.py) rolls it
out with the deployment's strategy (strategies.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from libs import ids
from libs.db import Database
from libs.errors import InvalidArgument, InvalidState, not_found
from libs.outbox import Outbox
from libs.pagination import decode_cursor, next_page, page_limit
from libs.principal import Principal
from services.instances import repository as repo
from services.instances import specs
from services.instances.domain import InstancesDomain, Page, ensure_not_suspended
from services.instances.repository import Deployment, Instance, Release, Scope, Values, now
from services.instances.strategies import DEFAULT, STRATEGIES


async def publish_deployment(outbox: Outbox, s: Any, type_: str, dep: Deployment, **extra: Any) -> None:
    await outbox.publish(
        s,
        type_,
        resource="deployment",
        resource_id=dep.id,
        tenant_id=dep.tenant_id,
        account_id=repo.account_of(dep.instance_id),
        data={
            "deployment_id": dep.id,
            "instance_id": dep.instance_id,
            "release_id": dep.release_id,
            "state": dep.state,
            "strategy": dep.strategy,
            **extra,
        },
    )


def deploy_specs(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": s["name"], "image": s["image"], "env": s["env"]} for s in services]


@dataclass(frozen=True)
class Plan:
    """What a deploy or a rollback asks for, once its checks have passed."""

    release: Release
    strategy: str
    services: list[dict[str, Any]]  # the services whose image or env change
    notes: str
    commit_sha: str
    rollback: bool


class DeploymentsDomain:
    def __init__(self, db: Database, instances: InstancesDomain, outbox: Outbox):
        self.db = db
        self.instances = instances
        self.outbox = outbox

    async def _publish(self, s: Any, type_: str, dep: Deployment, **extra: Any) -> None:
        await publish_deployment(self.outbox, s, type_, dep, **extra)

    async def _refuse_unless_deployable(
        self, s: AsyncSession, p: Principal, row: Instance, *, rollback_to: str | None = None
    ) -> None:
        ensure_not_suspended(row)
        if row.state != "running":
            raise InvalidState(
                f"instance {row.id!r} is {row.state}; deployments need a running instance",
                details={"state": row.state},
            )
        if rollback_to == row.current_release:
            raise InvalidState("the instance already runs that release", details={"state": row.state})
        if await repo.in_flight_deployment(s, Scope.of(p), row.id):
            raise InvalidState(
                "a deployment of this instance is already in progress", details={"state": row.state}
            )

    async def _launch(
        self,
        p: Principal,
        instance_id: str,
        plan: Callable[[AsyncSession, Instance], Awaitable[Plan]],
    ) -> Deployment:
        """The frame of deploy and rollback: the instance locked, the plan (its checks, and the
        release it deploys), then the pending deployment and `deploy.started`, and the
        reconciler woken to roll it out."""
        row = await self.instances.get(p, instance_id)
        await self.instances.writable(p, row.tenant_id)
        async with self.outbox.session() as s:
            row = await self.instances.load(s, p, instance_id, lock=True)
            want = await plan(s, row)
            dep = await repo.insert_deployment(s, self._new(row, want, p.key_id))
            extra = {"rollback": True} if want.rollback else {}
            await self._publish(s, "deploy.started", dep, **extra, version=want.release.version)
        self.instances.wake()
        return dep

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
    ) -> Deployment:
        validate_strategy(strategy)

        async def plan(s: AsyncSession, row: Instance) -> Plan:
            await self._refuse_unless_deployable(s, p, row)
            services = specs.apply_deploy(row.spec["services"], image, env, changes)
            release = await repo.insert_release(
                s,
                {
                    "id": ids.new_id("rel"),
                    "tenant_id": row.tenant_id,
                    "instance_id": instance_id,
                    "version": await repo.next_release_version(s, Scope.of(p), instance_id),
                    "snapshot": {"services": services, "replicas": row.replicas},
                    "notes": notes,
                    "commit_sha": commit_sha,
                    "active": False,
                    "created_at": now(),
                },
            )
            changed = {c["name"] for c in changes} | (
                {specs.main_service(services)["name"]} if image or env else set()
            )
            return Plan(
                release,
                strategy or DEFAULT,
                [x for x in services if x["name"] in changed],
                notes,
                commit_sha,
                rollback=False,
            )

        return await self._launch(p, instance_id, plan)

    async def rollback(self, p: Principal, instance_id: str, release_id: str) -> Deployment:
        async def plan(s: AsyncSession, row: Instance) -> Plan:
            release = await repo.get_release(s, Scope.of(p), release_id)
            if release is None or release.instance_id != instance_id:
                raise not_found("release", release_id)
            await self._refuse_unless_deployable(s, p, row, rollback_to=release_id)
            return Plan(
                release,
                "recreate",
                release.snapshot["services"],
                f"rollback to release {release.version}",
                release.commit_sha,
                rollback=True,
            )

        return await self._launch(p, instance_id, plan)

    @staticmethod
    def _new(row: Instance, plan: Plan, initiator: str) -> Values:
        t = now()
        live = specs.long_running(row.spec["services"])
        return {
            "id": ids.new_id("dep"),
            "tenant_id": row.tenant_id,
            "instance_id": row.id,
            "release_id": plan.release.id,
            "previous_release_id": row.current_release,
            "state": "pending",
            "strategy": plan.strategy,
            "is_rollback": plan.rollback,
            "services": deploy_specs(plan.services),
            "progress": {
                "total_replicas": row.replicas * len(live),
                "ready_replicas": 0,
                "replaced_replicas": 0,
                "services": {x["name"]: "pending" for x in live},
                "message": "queued",
            },
            "notes": plan.notes,
            "commit_sha": plan.commit_sha,
            "error": "",
            "initiator": initiator or "system",
            "cancel_requested": False,
            "started_at": None,
            "finished_at": None,
            "created_at": t,
            "updated_at": t,
        }

    async def cancel(self, p: Principal, deployment_id: str) -> None:
        dep = await self.get(p, deployment_id)
        await self.instances.writable(p, dep.tenant_id)
        async with self.outbox.session() as s:
            locked = await repo.get_deployment(s, Scope.of(p), deployment_id, lock=True)
            assert locked is not None
            dep = locked
            if dep.state == "pending":
                values: Values = {
                    "state": "cancelled",
                    "cancel_requested": True,
                    "finished_at": now(),
                    "progress": {**dep.progress, "message": "cancelled before it started"},
                }
                await repo.update_deployment(s, Scope.of(p), deployment_id, values)
                await self._publish(s, "deploy.cancelled", replace(dep, **values))
            elif dep.state == "running":
                # The executor sees this between steps, stops, and restores the previous release.
                await repo.update_deployment(s, Scope.of(p), deployment_id, {"cancel_requested": True})
            else:
                raise InvalidState(
                    f"deployment {deployment_id!r} is {dep.state}; only pending or running ones cancel",
                    details={"state": dep.state},
                )
        self.instances.wake()

    async def get(self, p: Principal, deployment_id: str) -> Deployment:
        async with self.db.session() as s:
            dep = await repo.get_deployment(s, Scope.of(p), deployment_id)
        if dep is None:
            raise not_found("deployment", deployment_id)
        return dep

    async def list_deployments(
        self, p: Principal, instance_id: str, cursor: str, limit: int
    ) -> Page[Deployment]:
        await self.instances.get(p, instance_id)
        after, n = decode_cursor(cursor), page_limit(limit)
        async with self.db.session() as s:
            rows, total = await repo.list_deployments(s, Scope.of(p), instance_id, after, n)
        return Page(*next_page(rows, n, lambda r: r.id), total)

    async def get_release(self, p: Principal, release_id: str) -> Release:
        async with self.db.session() as s:
            rel = await repo.get_release(s, Scope.of(p), release_id)
        if rel is None:
            raise not_found("release", release_id)
        return rel

    async def list_releases(self, p: Principal, instance_id: str, cursor: str, limit: int) -> Page[Release]:
        await self.instances.get(p, instance_id)
        after, n = decode_cursor(cursor), page_limit(limit)
        async with self.db.session() as s:
            rows, total = await repo.list_releases(s, Scope.of(p), instance_id, after, n)
        return Page(*next_page(rows, n, lambda r: r.id), total)


def validate_strategy(strategy: str) -> None:
    if strategy and strategy not in STRATEGIES:
        raise InvalidArgument(
            f"unknown strategy {strategy!r}", fields={"strategy": "rolling, recreate, blue-green or canary"}
        )
