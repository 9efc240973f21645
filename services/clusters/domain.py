"""Clusters and nodes: the one registry of engines, node status from the engines' heartbeats,
drain, and the placement check the instances service asks before it places a replica.

Status of a node, from the last poll of its cluster's engine (every `poll_interval`):
- the engine reports it ready → `ready`, or `draining` when its availability is not `active`;
- the engine reports it down or disconnected → `down`; unknown → `not_ready`;
- the engine does not answer (or no longer lists it) → `not_ready` once its last heartbeat is
  older than `not_ready_after`, `down` once older than `down_after`.

Drain (Zectre's): no new task is placed on the node; its running tasks keep running (Swarm
availability `pause`). `migrate` moves them away as Nomad's drain does (Swarm `drain`). On a
local cluster the engine knows no availability: ours is the only record, and placement reads it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from libs import principal as principals
from libs.errors import InvalidArgument, NotFound, PermissionDenied, not_found
from libs.ids import MAIN_CLUSTER_ID, is_uuid, new_uuid
from libs.outbox import Outbox
from libs.timeutil import now
from services.clusters import events
from services.clusters import repository as repo
from services.clusters.engines import DockerEngine, Engine, EngineError, EngineNode
from services.clusters.repository import ClusterRow, NodeRow

log = logging.getLogger("ctrlmesh.clusters")

LOCAL = "main"
TYPES = ("local", "self_managed", "managed")
# Node UUIDs are derived, so a node keeps its id across restarts and re-polls.
_NODE_NS = uuid.UUID("5b0c7a3e-8f61-4a53-9d6e-2f1d9e0b7c41")
DEFAULT_ENGINE = "unix:///var/run/docker.sock"


def node_uuid(cluster_id: str, engine_id: str) -> str:
    return str(uuid.uuid5(_NODE_NS, f"{cluster_id}/{engine_id}"))


def is_swarm(c: ClusterRow) -> bool:
    return c.type == "self_managed"


def status_of(n: EngineNode, availability: str) -> str:
    if n.state == "ready":
        return "ready" if availability == "active" else "draining"
    if n.state in ("down", "disconnected"):
        return "down"
    return "not_ready"


def stale_status(current: str, age: timedelta, not_ready_after: timedelta, down_after: timedelta) -> str:
    """A node its engine did not report on this poll, by the age of its last heartbeat."""
    if age >= down_after:
        return "down"
    if age >= not_ready_after:
        return "not_ready" if current != "down" else current
    return current


def require_global(p: principals.Principal, what: str) -> None:
    if not principals.is_global(p):
        raise PermissionDenied(f"{what} needs a global key")


class ClustersDomain:
    def __init__(
        self,
        db: Any,
        outbox: Outbox,
        *,
        local_endpoint: str,
        poll_interval: float,
        not_ready_after: timedelta,
        down_after: timedelta,
        engine_factory: Callable[[str], Engine] = DockerEngine,
    ):
        self.db = db
        self.outbox = outbox
        self.local_endpoint = local_endpoint or DEFAULT_ENGINE
        self.poll_interval = poll_interval
        self.not_ready_after = not_ready_after
        self.down_after = down_after
        self._factory = engine_factory
        self._engines: dict[str, Engine] = {}
        # One refresh of a cluster at a time: a GET and the poll loop share its result.
        self._refreshing: dict[str, asyncio.Lock] = {}

    def engine(self, c: ClusterRow) -> Engine:
        e = self._engines.get(c.id)
        if e is None or getattr(e, "endpoint", c.endpoint) != c.endpoint:
            e = self._factory(c.endpoint)
            self._engines[c.id] = e
        return e

    async def close(self) -> None:
        for e in self._engines.values():
            await e.close()

    # -- registry --------------------------------------------------------------------------------

    async def register_local(self) -> ClusterRow:
        """The `main` cluster for the configured engine, registered once (its endpoint follows
        the settings of the running process)."""
        async with self.outbox.session() as s:
            row = await repo.cluster_by_name(s, LOCAL)
            if row is None:
                row = await repo.insert_cluster(
                    s,
                    id=MAIN_CLUSTER_ID,
                    name=LOCAL,
                    type="local",
                    description=None,
                    config={},
                    endpoint=self.local_endpoint,
                )
                if row is not None:
                    await events.publish(
                        self.outbox, s, events.CLUSTER_REGISTERED, "cluster", row.id, events.snapshot(row)
                    )
                else:
                    row = await repo.cluster_by_name(s, LOCAL)
            elif row.type == "local" and row.endpoint != self.local_endpoint:
                await repo.set_cluster_endpoint(s, row.id, self.local_endpoint)
                row = await repo.get_cluster(s, row.id)
        assert row is not None
        return row

    async def create(
        self,
        p: principals.Principal,
        *,
        name: str,
        type_: str,
        description: str | None,
        endpoint: str,
        config: dict[str, Any],
    ) -> ClusterRow:
        require_global(p, "registering a cluster")
        if type_ == "managed":
            raise InvalidArgument(
                "managed clusters are not available: no managed backend is configured",
                fields={"type": "managed clusters are not available yet; use local or self_managed"},
            )
        docker_host = endpoint or str(config.get("docker_host") or "")
        if type_ == "self_managed" and not docker_host:
            raise InvalidArgument(
                "a self_managed cluster needs config.docker_host (its swarm manager's engine)",
                fields={"config.docker_host": "required for self_managed"},
            )
        if type_ == "local":
            docker_host = docker_host or self.local_endpoint
        if not docker_host.startswith(("unix://", "tcp://", "http://", "https://")):
            raise InvalidArgument(
                "config.docker_host must be a unix:// or tcp:// engine address",
                fields={"config.docker_host": "not a unix:// or tcp:// address"},
            )
        probe = self._factory(docker_host)
        try:
            await probe.probe(swarm=type_ == "self_managed")
        except EngineError as err:
            raise InvalidArgument(
                f"the cluster's engine was not accepted: {err}", fields={"config.docker_host": str(err)}
            ) from None
        finally:
            await probe.close()
        cfg = dict(config)
        if type_ == "self_managed":
            cfg["docker_host"] = docker_host
        async with self.outbox.session() as s:
            row = await repo.insert_cluster(
                s,
                id=new_uuid(),
                name=name,
                type=type_,
                description=description,
                config=cfg,
                endpoint=docker_host,
            )
            if row is None:
                from libs.errors import AlreadyExists

                raise AlreadyExists(f"a cluster named {name!r} exists", details={"name": name})
            await events.publish(
                self.outbox, s, events.CLUSTER_REGISTERED, "cluster", row.id, events.snapshot(row)
            )
        await self.refresh(row)
        return row

    async def list_clusters(self) -> list[tuple[ClusterRow, list[NodeRow]]]:
        async with self.db.session() as s:
            rows = await repo.list_clusters(s)
        out = await asyncio.gather(*(self.refresh(c) for c in rows))
        return list(zip(rows, out, strict=True))

    async def get_cluster(self, cluster_id: str) -> tuple[ClusterRow, list[NodeRow]]:
        async with self.db.session() as s:
            row = await repo.get_cluster(s, cluster_id) if is_uuid(cluster_id) else None
        if row is None:
            raise not_found("cluster", cluster_id)
        return row, await self.refresh(row)

    async def resolve(self, cluster_id: str) -> ClusterRow:
        """The cluster an instance is placed on: the one named, else `main` (every provider's
        default). A managed cluster cannot exist (refused at registration)."""
        async with self.db.session() as s:
            if not cluster_id:
                row = await repo.cluster_by_name(s, LOCAL)
            else:
                row = await repo.get_cluster(s, cluster_id) if is_uuid(cluster_id) else None
        if row is None:
            raise not_found("cluster", cluster_id or LOCAL)
        return row

    # -- nodes -----------------------------------------------------------------------------------

    async def refresh(self, c: ClusterRow) -> list[NodeRow]:
        """Read the cluster's nodes from its engine now and record what changed (the heartbeat);
        the rows as they are after it. An engine that does not answer ages its nodes instead."""
        lock = self._refreshing.setdefault(c.id, asyncio.Lock())
        async with lock:
            try:
                seen = await self.engine(c).nodes(swarm=is_swarm(c))
            except EngineError as err:
                log.info("cluster %s: %s", c.name, err)
                seen = None
            await self._record(c, seen)
            async with self.db.session() as s:
                return await repo.list_nodes(s, c.id)

    async def _record(self, c: ClusterRow, seen: list[EngineNode] | None) -> None:
        t = now()
        async with self.outbox.session() as s:
            known = {n.engine_id: n for n in await repo.list_nodes(s, c.id)}
            for en in seen or []:
                row = known.pop(en.engine_id, None)
                if row is None:
                    # A swarm's own availability is the truth for a node we did not know yet.
                    availability = en.availability if is_swarm(c) else "active"
                    status = status_of(en, availability)
                    created = await repo.insert_node(
                        s,
                        id=node_uuid(c.id, en.engine_id),
                        cluster_id=c.id,
                        engine_id=en.engine_id,
                        name=en.name,
                        address=en.address,
                        role=en.role,
                        availability=availability,
                        engine_state=en.state,
                        status=status,
                        cpu=en.cpu,
                        memory_mb=en.memory_mb,
                        running_tasks=en.running_tasks,
                        labels=en.labels,
                        last_heartbeat_at=t if en.state == "ready" else None,
                    )
                    if created is not None:
                        await self._status_event(s, created, "")
                    continue
                availability = en.availability if is_swarm(c) else row.availability
                status = status_of(en, availability)
                values: dict[str, Any] = {
                    "name": en.name,
                    "address": en.address,
                    "role": en.role,
                    "availability": availability,
                    "engine_state": en.state,
                    "status": status,
                    "cpu": en.cpu,
                    "memory_mb": en.memory_mb,
                    "running_tasks": en.running_tasks,
                    "labels": en.labels,
                }
                if en.state == "ready":
                    values["last_heartbeat_at"] = t
                await repo.update_node(s, row.id, **values)
                if status != row.status:
                    fresh = await repo.get_node(s, row.id)
                    assert fresh is not None
                    await self._status_event(s, fresh, row.status)
            # Not reported this time (engine away, or the node left the swarm).
            for row in known.values():
                age = t - (row.last_heartbeat_at or row.created_at)
                status = stale_status(row.status, age, self.not_ready_after, self.down_after)
                if seen is not None and row.status != "down" and status == row.status:
                    status = "not_ready"  # the engine answered without it: it left
                if status != row.status:
                    await repo.update_node(s, row.id, status=status)
                    fresh = await repo.get_node(s, row.id)
                    assert fresh is not None
                    await self._status_event(s, fresh, row.status)

    async def _status_event(self, s: Any, row: NodeRow, previous: str) -> None:
        await events.publish(
            self.outbox,
            s,
            events.NODE_STATUS_CHANGED,
            "node",
            row.id,
            {**events.snapshot(row), "previous_status": previous or None},
        )

    async def poll(self) -> None:
        """One heartbeat pass over every cluster (the loop's body)."""
        async with self.db.session() as s:
            rows = await repo.list_clusters(s)
        await asyncio.gather(*(self.refresh(c) for c in rows))

    async def list_nodes(self, cluster_id: str, status: str) -> list[NodeRow]:
        async with self.db.session() as s:
            return await repo.list_nodes(s, cluster_id, status)

    async def get_node(self, node_id: str) -> NodeRow:
        async with self.db.session() as s:
            row = await repo.get_node(s, node_id) if is_uuid(node_id) else None
        if row is None:
            raise not_found("node", node_id)
        return row

    async def set_drain(
        self, p: principals.Principal, node_id: str, *, drain: bool, migrate: bool
    ) -> NodeRow:
        require_global(p, "draining a node")
        row = await self.get_node(node_id)
        async with self.db.session() as s:
            c = await repo.get_cluster(s, row.cluster_id)
        if c is None:
            raise not_found("node", node_id)
        availability = ("drain" if migrate else "pause") if drain else "active"
        if is_swarm(c):
            try:
                await self.engine(c).set_availability(row.engine_id, availability)
            except EngineError as err:
                from libs.errors import Unavailable

                raise Unavailable(f"the cluster's engine did not take the change: {err}") from None
        async with self.outbox.session() as s:
            locked = await repo.get_node(s, node_id, lock=True)
            if locked is None:
                raise NotFound(f"node {node_id!r} not found", details={"resource": "node"})
            status = locked.status
            if status in ("ready", "draining"):
                status = "draining" if drain else "ready"
            await repo.update_node(s, node_id, availability=availability, status=status)
            fresh = await repo.get_node(s, node_id)
            assert fresh is not None
            changed = locked.availability != availability
            if changed:
                kind = events.NODE_DRAINED if drain else events.NODE_UNDRAINED
                await events.publish(
                    self.outbox, s, kind, "node", node_id, {**events.snapshot(fresh), "migrate": migrate}
                )
            if status != locked.status:
                await self._status_event(s, fresh, locked.status)
        return fresh

    # -- placement -------------------------------------------------------------------------------

    async def placement(self, provider_name: str, cluster_id: str) -> tuple[bool, str, str]:
        """May a new replica be placed now, and if not why. Every instance provider runs on the
        configured engine, the `main` cluster, unless the instance names a cluster."""
        async with self.db.session() as s:
            c = await repo.get_cluster(s, cluster_id) if cluster_id else await repo.cluster_by_name(s, LOCAL)
            if c is None:
                return True, "", ""
            rows = await repo.list_nodes(s, c.id)
        if not rows:
            return True, "", c.id  # not polled yet: the engine itself will say
        if any(n.availability == "active" and n.status == "ready" for n in rows):
            return True, "", c.id
        if all(n.availability != "active" for n in rows):
            return False, f"waiting for a node: every node of cluster {c.name!r} is drained", c.id
        return False, f"waiting for a node: no node of cluster {c.name!r} is ready", c.id
