"""The engine driver: what the clusters service reads from (and writes to) a Docker engine.

A `local` cluster is one engine host shown as one node (drain is ours alone: the engine has no
notion of it, so the instances service asks us before placing). A `self_managed` cluster is a
Docker Swarm reached through a manager's engine: its nodes are the swarm's nodes, and drain is
written to the swarm as the node's availability (`pause`: no new tasks, running ones stay;
`drain`: the swarm moves them away), so the swarm's own scheduler obeys it too.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiodocker
from aiodocker.exceptions import DockerError

# How long one engine call may take before the engine counts as not answering.
CALL_TIMEOUT = 5.0


class EngineError(Exception):
    """The engine does not answer, or refused; the message is safe to show an operator."""


@dataclass(frozen=True)
class EngineNode:
    engine_id: str
    name: str
    address: str
    role: str
    # "ready", "down", "unknown" or "disconnected" (a swarm's view; a local host answers "ready").
    state: str
    # "active", "pause" or "drain" (the swarm's; a local host is always "active").
    availability: str
    cpu: float
    memory_mb: int
    running_tasks: int
    labels: dict[str, str] = field(default_factory=dict)


class Engine(Protocol):
    async def probe(self, *, swarm: bool) -> None:
        """Raise EngineError saying why the engine cannot back a cluster of this kind."""

    async def nodes(self, *, swarm: bool) -> list[EngineNode]: ...

    async def set_availability(self, engine_id: str, availability: str) -> None: ...

    async def close(self) -> None: ...


def _address(endpoint: str) -> str:
    """The host a local engine's published ports are reached on: loopback for a Unix socket."""
    if endpoint.startswith(("tcp://", "http://", "https://")):
        return endpoint.split("://", 1)[1].rsplit(":", 1)[0] or "127.0.0.1"
    return "127.0.0.1"


class DockerEngine:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._docker: aiodocker.Docker | None = None

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self.endpoint or None)
        return self._docker

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, CALL_TIMEOUT)
        except TimeoutError:
            raise EngineError(
                f"the engine at {self.endpoint} did not answer {what} within {CALL_TIMEOUT:g}s"
            ) from None
        except DockerError as err:
            raise EngineError(f"the engine at {self.endpoint} refused {what}: {err.message}") from None
        except (OSError, ValueError, aiodocker.exceptions.DockerContainerError) as err:
            raise EngineError(f"the engine at {self.endpoint} does not answer: {err}") from None
        except Exception as err:  # aiohttp's connection errors and the like
            raise EngineError(
                f"the engine at {self.endpoint} does not answer: {type(err).__name__}"
            ) from None

    async def info(self) -> dict[str, Any]:
        return dict(await self._call("info", self.docker.system.info()))

    async def probe(self, *, swarm: bool) -> None:
        info = await self.info()
        if not swarm:
            return
        sw = info.get("Swarm") or {}
        if sw.get("LocalNodeState") != "active":
            raise EngineError(f"the engine at {self.endpoint} is not part of a swarm")
        if not sw.get("ControlAvailable"):
            raise EngineError(f"the engine at {self.endpoint} is a swarm worker, not a manager")

    async def nodes(self, *, swarm: bool) -> list[EngineNode]:
        if not swarm:
            return [await self._host()]
        raw = await self._call("node list", self.docker.nodes.list())
        tasks = await self._call("task list", self.docker.tasks.list(filters={"desired-state": ["running"]}))
        running: dict[str, int] = {}
        for t in tasks:
            if (t.get("Status") or {}).get("State") == "running":
                running[t.get("NodeID", "")] = running.get(t.get("NodeID", ""), 0) + 1
        out = []
        for n in raw:
            spec, desc, status = n.get("Spec") or {}, n.get("Description") or {}, n.get("Status") or {}
            res = desc.get("Resources") or {}
            out.append(
                EngineNode(
                    engine_id=n["ID"],
                    name=desc.get("Hostname") or n["ID"][:12],
                    address=status.get("Addr") or "",
                    role=spec.get("Role") or "worker",
                    state=status.get("State") or "unknown",
                    availability=spec.get("Availability") or "active",
                    cpu=round((res.get("NanoCPUs") or 0) / 1e9, 3),
                    memory_mb=int((res.get("MemoryBytes") or 0) // (1024 * 1024)),
                    running_tasks=running.get(n["ID"], 0),
                    labels=dict(spec.get("Labels") or {}),
                )
            )
        return out

    async def _host(self) -> EngineNode:
        info = await self.info()
        filters = json.dumps({"label": ["ctrlmesh.managed=true"], "status": ["running"]})
        running = await self._call(
            "container list", self.docker._query_json("containers/json", params={"filters": filters})
        )
        labels = {}
        for item in info.get("Labels") or []:
            k, _, v = str(item).partition("=")
            labels[k] = v
        return EngineNode(
            engine_id=str(info.get("ID") or info.get("Name") or "local"),
            name=str(info.get("Name") or "local"),
            address=_address(self.endpoint),
            role="manager",
            state="ready",
            availability="active",
            cpu=float(info.get("NCPU") or 0),
            memory_mb=int((info.get("MemTotal") or 0) // (1024 * 1024)),
            running_tasks=len(running),
            labels=labels,
        )

    async def set_availability(self, engine_id: str, availability: str) -> None:
        # The swarm refuses an update made against a stale version: read, then write, retried
        # once when another writer got in between.
        for attempt in range(3):
            node = await self._call("node inspect", self.docker.nodes.inspect(node_id=engine_id))
            spec = dict(node.get("Spec") or {})
            if spec.get("Availability") == availability:
                return
            spec["Availability"] = availability
            try:
                await self._call(
                    "node update",
                    self.docker.nodes.update(node_id=engine_id, version=node["Version"]["Index"], spec=spec),
                )
                return
            except EngineError:
                if attempt == 2:
                    raise
