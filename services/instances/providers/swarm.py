"""The `swarm` provider: Docker Swarm services and tasks, for users who outgrow one machine.

One swarm service per group (an instance's service at one release), with the replica count,
CPU/memory limits, environment and labels in its spec. In-place changes (resources) roll out
through swarm's own rolling update, one task at a time, start-first, rolling back on failure.
Ports are published in host mode: swarm's ingress routing mesh needs iptables, which a private
engine may not have, and host mode still gives each task its own host port. (Swarm binds host
ports on every interface; endpoints name 127.0.0.1.)

Logs, exec and resource usage go to the tasks' containers through the engine API, which holds on
a single-node swarm and on the manager's own tasks.

Secrets: `env` secrets join the service's environment (over its `env` entries of the same name);
`file`/`tls` secrets become Swarm secrets (kept in the managers' encrypted Raft log, mounted by
each node on a tmpfs, read-only at /run/secrets/<key>), one per group and key, removed with the
group; registry credentials go with the service create as X-Registry-Auth. A service scaled up
from zero (a restart) whose secrets changed gets them in its task template first.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
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
from services.instances.providers.docker import (
    DockerProvider,
    container_env,
    parse_time,
    registry_auth_header,
)

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

    def __init__(
        self,
        url: str | None,
        *,
        pull: bool,
        stop_timeout: float,
        name: str = "swarm",
        secrets_dir: Path = Path("/dev/shm/ctrlmesh-secrets"),
        pg_socket_dir: Path | None = None,
    ):
        # A swarm's tasks land on any node, where the gateway's socket is not: its apps reach
        # the gateway over TCP (with TLS) at its advertised address, so `pg_socket_dir` is unused.
        del pg_socket_dir
        super().__init__(url, pull=pull, stop_timeout=stop_timeout, name=name, secrets_dir=secrets_dir)
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

    async def _secret_refs(self, group: GroupSpec) -> list[dict[str, Any]]:
        """The group's file secrets as Swarm secrets (created once; the name is derived from the
        group, the key and the exact versions, so equal names hold equal data)."""
        refs = []
        for key, data in sorted(group.secrets.files.items()):
            digest = hashlib.sha256(
                f"{group_name(group)}|{key}|{group.secrets.fingerprint}".encode()
            ).hexdigest()
            name = f"cm-{digest[:40]}"
            body = {
                "Name": name,
                "Data": base64.b64encode(data).decode(),
                "Labels": {"ctrlmesh.instance": group.instance_id, "ctrlmesh.group": group_name(group)},
            }
            try:
                made = await self.docker._query_json("secrets/create", method="POST", data=body)
                secret_id = made["ID"]
            except DockerError as err:
                if err.status != 409:
                    raise ProviderError(f"creating a swarm secret failed: {err.message}") from err
                secret_id = (await self.docker._query_json(f"secrets/{name}"))["ID"]
            refs.append(
                {
                    "File": {"Name": key, "UID": "0", "GID": "0", "Mode": 0o444},
                    "SecretID": secret_id,
                    "SecretName": name,
                }
            )
        return refs

    async def _drop_secrets(self, instance_id: str, group: str = "") -> None:
        """Remove the instance's (or one group's) Swarm secrets no service uses any more."""
        labels = [f"ctrlmesh.instance={instance_id}"] + ([f"ctrlmesh.group={group}"] if group else [])
        try:
            found = await self.docker._query_json(
                "secrets", params={"filters": json.dumps({"label": labels})}
            )
        except DockerError as err:
            raise ProviderError(f"listing swarm secrets failed: {err.message}") from err
        for sec in found:
            try:
                async with self.docker._query(f"secrets/{sec['ID']}", method="DELETE"):
                    pass
            except DockerError as err:
                if err.status not in (404, 400, 409):  # gone, or still in use by a task
                    raise ProviderError(f"removing a swarm secret failed: {err.message}") from err

    def _spec(
        self, group: GroupSpec, replicas: int, image: str = "", secrets: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        svc = group.service
        res = svc.get("resources") or {}
        container: dict[str, Any] = {
            "Image": image or svc["image"],
            "Env": container_env(svc, group.secrets),
            "Labels": labels_for(group),
            "Init": True,
            "StopGracePeriod": self._stop_grace,
        }
        if secrets:
            container["Secrets"] = secrets
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
                        secrets=labels.get("ctrlmesh.secrets", ""),
                    )
                )
        out.sort(key=lambda r: (r.service, r.release_id, r.index))
        return out

    # -- changing ----------------------------------------------------------------------------

    async def scale_group(self, group: GroupSpec, count: int) -> None:
        name = group_name(group)
        current = await self._find(name)
        if current is None:
            if count == 0:
                return
            image = await self._image(group.service["image"])
            spec = self._spec(group, count, image, await self._secret_refs(group))
            auth = group.secrets.auth_for(group.service["image"]) if self._pull else None
            headers = {"X-Registry-Auth": registry_auth_header(auth)} if auth else None
            try:
                await self.docker._query_json("services/create", method="POST", data=spec, headers=headers)
            except DockerError as err:
                raise ProviderError(f"creating {name} failed: {err.message}") from err
            return
        template: dict[str, Any] | None = None
        was = current["Spec"].get("Mode", {}).get("Replicated", {}).get("Replicas")
        have = (current["Spec"].get("Labels") or {}).get("ctrlmesh.secrets", "")
        if was == 0 and count > 0 and have != group.secrets.fingerprint:
            # Coming up from zero (a restart) after its secrets changed: with the current ones.
            image = current["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
            template = self._spec(group, count, image, await self._secret_refs(group))

        def replicas(spec: dict[str, Any]) -> bool:
            if template is not None:
                spec["Labels"] = template["Labels"]
                spec["TaskTemplate"]["ContainerSpec"] = template["TaskTemplate"]["ContainerSpec"]
            elif spec.get("Mode", {}).get("Replicated", {}).get("Replicas") == count:
                return False
            spec["Mode"] = {"Replicated": {"Replicas": count}}
            return True

        await self._mutate(name, replicas)

    async def remove_group(self, instance_id: str, service: str, release_id: str) -> None:
        for svc in await self._services(instance_id):
            labels = (svc.get("Spec") or {}).get("Labels") or {}
            if labels.get("ctrlmesh.service") == service and labels.get("ctrlmesh.release") == release_id:
                await self._delete(svc["ID"])
                await self._drop_secrets(instance_id, svc["Spec"]["Name"])

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
        removed = len(found) + await super().remove_all(instance_id)
        await self._drop_secrets(instance_id)
        return removed

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
