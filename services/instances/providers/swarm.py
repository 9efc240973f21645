"""The `swarm` provider: Docker Swarm services and tasks, for users who outgrow one machine.

One swarm service per group (an instance's service at one release), with the replica count,
CPU/memory limits, environment and labels in its spec. In-place changes (resources) roll out
through swarm's own rolling update, one task at a time, start-first, rolling back on failure.
Ports are published in host mode: swarm's ingress routing mesh needs iptables, which a private
engine may not have, and host mode still gives each task its own host port. (Swarm binds host
ports on every interface; endpoints name 127.0.0.1.)

Logs, exec and resource usage go to the tasks' containers through the engine API, which holds on
a single-node swarm and on the manager's own tasks.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from typing import Any

from aiodocker.exceptions import DockerError

from services.instances.providers.base import (
    GroupSpec,
    ImageNotFound,
    ProviderError,
    Replica,
    engine_protocol,
    group_name,
    labels_for,
)
from services.instances.providers.docker import DockerProvider, container_env, parse_time

_NS = 1_000_000_000


def published_ports(task_status: dict[str, Any]) -> dict[int, int]:
    """Container port → host port of a task. An engine with IPv6 binds each port twice, 0.0.0.0
    first and then `::`, and may give the two different host ports; the task lists both without
    the address, so the first one is the port 127.0.0.1 reaches. (Taking the last one named the
    IPv6 port: refused on 127.0.0.1, or a port an older task holds on IPv4, so endpoints answered
    for the previous release.)"""
    out: dict[int, int] = {}
    for p in (task_status.get("PortStatus") or {}).get("Ports") or []:
        if p.get("PublishedPort"):
            out.setdefault(int(p["TargetPort"]), int(p["PublishedPort"]))
    return out


class SwarmProvider(DockerProvider):
    name = "swarm"
    region = "local"

    def __init__(self, url: str | None, *, pull: bool, stop_timeout: float, name: str = "swarm"):
        super().__init__(url, pull=pull, stop_timeout=stop_timeout, name=name)
        self._stop_grace = int(max(1.0, stop_timeout) * _NS)

    async def ping(self) -> None:
        await super().ping()
        info = await self.docker.system.info()
        state = (info.get("Swarm") or {}).get("LocalNodeState")
        if state != "active" or not (info.get("Swarm") or {}).get("ControlAvailable"):
            raise ProviderError(f"the engine is not a swarm manager (swarm state {state!r})")

    # -- specs -------------------------------------------------------------------------------

    async def _image(self, image: str) -> str:
        """With pulls off, the local image's ID: a task naming its image by ID is never pulled,
        while a name makes the node try the registry first."""
        if self._pull:
            return image
        try:
            return str((await self.docker.images.inspect(image))["Id"])
        except DockerError as err:
            raise ImageNotFound(f"image {image!r} is not on the engine") from err

    def _spec(self, group: GroupSpec, replicas: int, image: str = "") -> dict[str, Any]:
        svc = group.service
        res = svc.get("resources") or {}
        container: dict[str, Any] = {
            "Image": image or svc["image"],
            "Env": container_env(svc),
            "Labels": labels_for(group),
            "Init": True,
            "StopGracePeriod": self._stop_grace,
        }
        if svc.get("command"):
            container["Command"] = list(svc["command"])
        if svc.get("args"):
            container["Args"] = list(svc["args"])
        ports = [
            {
                "Protocol": engine_protocol(p.get("protocol", "")),
                "TargetPort": int(p["container_port"]),
                "PublishMode": "host",
            }
            for p in svc.get("ports") or []
        ]
        return {
            "Name": group_name(group),
            "Labels": labels_for(group),
            "TaskTemplate": {
                "ContainerSpec": container,
                "Resources": {
                    "Limits": {
                        "NanoCPUs": int(res.get("cpu_millis") or 0) * 1_000_000,
                        "MemoryBytes": int(res.get("memory_mb") or 0) * 1024 * 1024,
                    }
                },
                "RestartPolicy": {"Condition": "any", "Delay": _NS},
            },
            "Mode": {"Replicated": {"Replicas": replicas}},
            # A task at a time, the new one up before the old one goes; undo a failed update.
            "UpdateConfig": {
                "Parallelism": 1,
                "Order": "start-first",
                "FailureAction": "rollback",
                "Monitor": 2 * _NS,
            },
            "RollbackConfig": {"Parallelism": 1, "Order": "start-first"},
            "EndpointSpec": {"Mode": "vip", "Ports": ports},
        }

    async def _services(self, instance_id: str) -> list[dict[str, Any]]:
        filters = json.dumps({"label": [f"ctrlmesh.instance={instance_id}"]})
        try:
            return await self.docker._query_json("services", params={"filters": filters})
        except DockerError as err:
            raise ProviderError(f"listing swarm services failed: {err.message}") from err

    async def _find(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.docker._query_json(f"services/{name}")
        except DockerError as err:
            if err.status == 404:
                return None
            raise ProviderError(f"inspecting {name} failed: {err.message}") from err

    async def _mutate(self, name: str, change: Callable[[dict[str, Any]], bool]) -> None:
        """Read the service, let `change` edit its spec (False: nothing to do), write it back.
        The manager itself updates a new service right after it is created, so a write can race
        it ("update out of sequence"): read again and retry."""
        for attempt in range(5):
            current = await self._find(name)
            if current is None:
                return
            spec = copy.deepcopy(current["Spec"])
            if not change(spec):
                return
            try:
                await self.docker._query_json(
                    f"services/{current['ID']}/update",
                    method="POST",
                    params={"version": str(current["Version"]["Index"])},
                    data=spec,
                )
                return
            except DockerError as err:
                if "out of sequence" not in str(err.message) or attempt == 4:
                    raise ProviderError(f"updating {name} failed: {err.message}") from err
            await asyncio.sleep(0.1)

    # -- reading -----------------------------------------------------------------------------

    async def replicas(self, instance_id: str) -> list[Replica]:
        out: list[Replica] = []
        for svc in await self._services(instance_id):
            labels = (svc.get("Spec") or {}).get("Labels") or {}
            filters = json.dumps({"service": [svc["ID"]], "desired-state": ["running"]})
            try:
                tasks = await self.docker._query_json("tasks", params={"filters": filters})
            except DockerError as err:
                raise ProviderError(f"listing tasks failed: {err.message}") from err
            for t in tasks:
                status = t.get("Status") or {}
                ports = published_ports(status)
                out.append(
                    Replica(
                        ref=t["ID"],
                        service=labels.get("ctrlmesh.service", ""),
                        release_id=labels.get("ctrlmesh.release", ""),
                        index=int(t.get("Slot") or 0) - 1,
                        state=status.get("State", ""),
                        ports=ports,
                        container_id=(status.get("ContainerStatus") or {}).get("ContainerID", ""),
                        started_at=parse_time(status.get("Timestamp")),
                    )
                )
        out.sort(key=lambda r: (r.service, r.release_id, r.index))
        return out

    # -- changing ----------------------------------------------------------------------------

    async def scale_group(self, group: GroupSpec, count: int) -> None:
        name = group_name(group)
        if await self._find(name) is None:
            if count == 0:
                return
            spec = self._spec(group, count, await self._image(group.service["image"]))
            try:
                await self.docker._query_json("services/create", method="POST", data=spec)
            except DockerError as err:
                raise ProviderError(f"creating {name} failed: {err.message}") from err
            return

        def replicas(spec: dict[str, Any]) -> bool:
            if spec.get("Mode", {}).get("Replicated", {}).get("Replicas") == count:
                return False
            spec["Mode"] = {"Replicated": {"Replicas": count}}
            return True

        await self._mutate(name, replicas)

    async def remove_group(self, instance_id: str, service: str, release_id: str) -> None:
        for svc in await self._services(instance_id):
            labels = (svc.get("Spec") or {}).get("Labels") or {}
            if labels.get("ctrlmesh.service") == service and labels.get("ctrlmesh.release") == release_id:
                await self._delete(svc["ID"])

    async def _delete(self, service_id: str) -> None:
        try:
            async with self.docker._query(f"services/{service_id}", method="DELETE"):
                pass
        except DockerError as err:
            if err.status != 404:
                raise ProviderError(f"removing a swarm service failed: {err.message}") from err

    async def remove_all(self, instance_id: str) -> int:
        found = await self._services(instance_id)
        for svc in found:
            await self._delete(svc["ID"])
        # Task containers linger briefly after their service goes; remove them too.
        return len(found) + await super().remove_all(instance_id)

    async def stop(self, instance_id: str) -> None:
        def none(spec: dict[str, Any]) -> bool:
            spec["Mode"] = {"Replicated": {"Replicas": 0}}
            return True

        for svc in await self._services(instance_id):
            await self._mutate(svc["ID"], none)

    async def update_resources(self, group: GroupSpec) -> None:
        wanted = self._spec(group, 0)["TaskTemplate"]["Resources"]

        def resources(spec: dict[str, Any]) -> bool:
            limits = spec["TaskTemplate"].get("Resources", {}).get("Limits", {})
            if {k: limits.get(k, 0) for k in wanted["Limits"]} == wanted["Limits"]:
                return False  # unchanged: no rolling update for nothing
            spec["TaskTemplate"]["Resources"] = wanted
            return True

        await self._mutate(group_name(group), resources)
