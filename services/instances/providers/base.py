"""The provider interface: what the instances service needs from a container engine.

An instance's replicas are organised in *groups*: the replicas of one service at one release.
Deployment strategies are written once, in terms of groups (scale the new group up, the old one
down, wait for health), so every provider gets rolling, recreate, blue-green and canary with the
same semantics; a provider only has to make a group have N replicas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

# Capability strings (ctrlplane's vocabulary).
CAPABILITIES = (
    "provision",
    "deploy",
    "scale",
    "logs",
    "exec",
    "strategy:rolling",
    "strategy:recreate",
    "strategy:blue-green",
    "strategy:canary",
)


class ProviderError(Exception):
    """The engine refused or failed an operation; the message is safe to show an operator."""


class ImageNotFound(ProviderError):
    pass


@dataclass(frozen=True)
class Injection:
    """The secrets a group's replicas start with (services/instances/secrets_client.py resolves
    them at each rollout). Never persisted, never logged: the values are left out of repr."""

    # Environment variables; they override the service's `env` entries of the same name.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    # Files mounted read-only at /run/secrets/<name> (from memory, never the host's disk).
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    # Registry credentials for image pulls: {"username", "password", "serveraddress"} each.
    registry_auth: tuple[dict[str, str], ...] = field(default=(), repr=False)
    # Names the exact secret versions (ids and versions, never values): replicas started with
    # another fingerprint are started anew when they next start.
    fingerprint: str = ""

    def auth_for(self, image: str) -> dict[str, str] | None:
        """The credentials of the registry `image` is pulled from (Docker Hub without a host)."""
        head = image.split("/", 1)[0] if "/" in image else ""
        host = head if ("." in head or ":" in head or head == "localhost") else "docker.io"
        for auth in self.registry_auth:
            server = auth.get("serveraddress", "").removeprefix("https://").removeprefix("http://")
            server = server.split("/", 1)[0]
            if server == host or (
                host == "docker.io" and server in ("", "index.docker.io", "registry-1.docker.io")
            ):
                return auth
        return None


NO_SECRETS = Injection()


@dataclass
class GroupSpec:
    """What one group runs: one service of an instance at one release."""

    instance_id: str
    tenant_id: str
    release_id: str
    # A ServiceSpec as stored in the instance/release snapshot (see domain.ServiceSpec).
    service: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    secrets: Injection = NO_SECRETS

    @property
    def service_name(self) -> str:
        return str(self.service["name"])


@dataclass
class Replica:
    """One running unit of a group (a container, or a swarm task's container)."""

    ref: str
    service: str
    release_id: str
    index: int
    # "running", "created", "exited", "restarting", "starting", ...
    state: str
    # container port → host port published on 127.0.0.1.
    ports: dict[int, int] = field(default_factory=dict)
    # The container to exec into / read logs from (empty while a task has none yet).
    container_id: str = ""
    started_at: datetime | None = None
    restarts: int = 0
    # The secrets fingerprint the replica was started with (Injection.fingerprint).
    secrets: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def slot(self) -> str:
        """The replica's place in its group, whatever container fills it (a draining rollout
        names the replicas it is about to stop by it, in its deployment's `progress.leaving`)."""
        return f"{self.service}/{self.release_id}/{self.index}"


@dataclass
class Usage:
    cpu_percent: float = 0.0
    memory_used_mb: int = 0
    memory_limit_mb: int = 0
    network_in_mb: float = 0.0
    network_out_mb: float = 0.0
    containers: int = 0


@dataclass
class LogLine:
    timestamp: datetime
    stream: str  # "stdout" or "stderr"
    message: str
    service: str = ""


class Provider(Protocol):
    name: str
    region: str
    capabilities: tuple[str, ...]

    async def ping(self) -> None:
        """Raise ProviderError when the engine does not answer."""

    async def replicas(self, instance_id: str) -> list[Replica]: ...

    async def scale_group(self, group: GroupSpec, count: int) -> None:
        """Make the group have exactly `count` replicas, all started."""

    async def remove_group(self, instance_id: str, service: str, release_id: str) -> None: ...

    async def remove_all(self, instance_id: str) -> int:
        """Remove everything the engine holds for the instance; returns how much was removed."""

    async def stop(self, instance_id: str) -> None:
        """Stop every replica (they come back with scale_group)."""

    async def update_resources(self, group: GroupSpec) -> None:
        """Apply the group's (changed) resources to its existing replicas."""

    async def usage(self, instance_id: str) -> Usage: ...

    def logs(
        self, instance_id: str, *, tail: int, since: datetime | None, follow: bool
    ) -> AsyncIterator[LogLine]: ...

    async def exec(self, container_id: str, command: list[str], limit_s: float) -> tuple[int, str]: ...

    async def close(self) -> None: ...


def labels_for(group: GroupSpec, index: int | None = None) -> dict[str, str]:
    """Engine labels: the user's labels, then ours (ours win, the reconciler relies on them)."""
    out = {f"user.{k}": v for k, v in group.labels.items()}
    out.update(
        {
            "ctrlmesh.managed": "true",
            "ctrlmesh.instance": group.instance_id,
            "ctrlmesh.tenant": group.tenant_id,
            "ctrlmesh.service": group.service_name,
            "ctrlmesh.release": group.release_id,
            "ctrlmesh.role": str(group.service.get("role") or "main"),
        }
    )
    if group.secrets.fingerprint:
        out["ctrlmesh.secrets"] = group.secrets.fingerprint
    if index is not None:
        out["ctrlmesh.replica"] = str(index)
    return out


def group_name(group: GroupSpec) -> str:
    # The id's tail is its random part; enough to tell releases of one instance apart.
    return f"cm-{group.instance_id}-{group.service_name}-{group.release_id[-8:]}"


def engine_protocol(protocol: str) -> str:
    return "udp" if protocol == "udp" else "tcp"
