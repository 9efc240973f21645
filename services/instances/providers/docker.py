"""The `docker` provider: one Docker engine, one container per replica.

Containers carry CPU and memory limits, the service's environment, our labels
(`ctrlmesh.instance=<id>`, service, release, replica index), an `unless-stopped` restart policy
and an init process (so SIGTERM stops them promptly); every container port is published on
127.0.0.1 on a host port the engine picks. The engine is the source of truth for what exists:
everything is found again by label, which is what makes deletes convergent.

Secrets (`GroupSpec.secrets`): `env` secrets are added to the environment, overriding the
service's `env` entry of the same name; `file` (and `tls`) secrets are written to a directory of
their own per container under `CTRLMESH_SECRETS_RUNTIME_DIR` (default /dev/shm/ctrlmesh-secrets),
which must be a tmpfs, and that directory is bind-mounted read-only at /run/secrets: the values
live in memory, never on the host's disk, and go when the container does. (A bind mount names a
path on the engine's host, so file secrets need the engine on this host: a unix socket.)
A container whose injected `PGHOST` is /run/ctrlmesh/pg (a binding to a managed database) gets
the PG Gateway's socket directory bind-mounted there, its way to the gateway that never leaves
the host (libs/pg_socket.py). Registry credentials go with pulls as X-Registry-Auth. A stopped replica whose secrets changed is
created anew rather than started again, so a restart runs with the current versions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError

from libs import pg_socket
from services.instances.providers.base import (
    CAPABILITIES,
    GroupSpec,
    ImageNotFound,
    Injection,
    LogLine,
    ProviderError,
    Replica,
    Usage,
    engine_protocol,
    group_name,
    labels_for,
)

log = logging.getLogger("ctrlmesh.instances.docker")

# Starts of one container after its published port turned out taken (see DockerProvider._start).
PORT_RETRIES = 8


def parse_time(value: str | None) -> datetime | None:
    if not value or value.startswith("0001-"):
        return None
    # Docker gives nanoseconds; Python parses microseconds.
    head, _, rest = value.partition(".")
    frac = "".join(ch for ch in rest if ch.isdigit())[:6]
    try:
        return datetime.fromisoformat(f"{head}.{frac or '0'}+00:00").astimezone(UTC)
    except ValueError:
        return None


def split_log_line(raw: str) -> tuple[datetime, str]:
    """`<RFC3339Nano timestamp> <message>` (logs requested with timestamps=1)."""
    ts, _, msg = raw.partition(" ")
    return parse_time(ts) or datetime.now(UTC), msg.rstrip("\n")


def container_env(service: dict[str, Any], secrets: Injection | None = None) -> list[str]:
    """The service's env with its env secrets over it (a secret wins over an entry of its name)."""
    env = dict(service.get("env") or {})
    if secrets is not None:
        env.update(secrets.env)
    return [f"{k}={v}" for k, v in sorted(env.items())]


def registry_auth_header(auth: dict[str, str]) -> str:
    """The X-Registry-Auth value: base64url of the JSON credentials."""
    return base64.urlsafe_b64encode(json.dumps(auth).encode()).decode()


SECRETS_MOUNT = "/run/secrets"
_TMPFS = ("tmpfs", "ramfs")


def memory_backed(path: Path) -> bool:
    """True when `path` lies on a tmpfs/ramfs (the longest mount point above it decides)."""
    best, fstype = "", ""
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount = left.split()[4].replace("\\040", " ")
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, fstype = mount, right.split()[0]
    return fstype in _TMPFS


def cpu_percent(stats: dict[str, Any]) -> float:
    """Docker's own formula (the one `docker stats` shows)."""
    cpu, pre = stats.get("cpu_stats") or {}, stats.get("precpu_stats") or {}
    delta = (cpu.get("cpu_usage", {}).get("total_usage", 0) or 0) - (
        pre.get("cpu_usage", {}).get("total_usage", 0) or 0
    )
    system = (cpu.get("system_cpu_usage") or 0) - (pre.get("system_cpu_usage") or 0)
    cpus = cpu.get("online_cpus") or len(cpu.get("cpu_usage", {}).get("percpu_usage") or []) or 1
    if delta > 0 and system > 0:
        return round(delta / system * cpus * 100.0, 3)
    return 0.0


class DockerProvider:
    name = "docker"
    region = "local"
    capabilities: tuple[str, ...] = CAPABILITIES

    def __init__(
        self,
        url: str | None,
        *,
        pull: bool,
        stop_timeout: float,
        name: str = "docker",
        secrets_dir: Path = Path("/dev/shm/ctrlmesh-secrets"),
        pg_socket_dir: Path | None = None,
    ):
        self.name = name
        self._url = url
        self._pull = pull
        self._stop_timeout = max(0, round(stop_timeout))
        self._docker: aiodocker.Docker | None = None
        self._secrets_dir = secrets_dir
        # The PG Gateway's socket directory, mounted into containers bound to a managed database
        # (libs/pg_socket.py); a bind mount names a path on the engine's host: local engines only.
        self._pg_socket_dir = pg_socket_dir if not url or url.startswith("unix://") else None

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self._url)
        return self._docker

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    async def ping(self) -> None:
        try:
            await asyncio.wait_for(self.docker.version(), 5)
        except (DockerError, OSError, TimeoutError, Exception) as err:
            raise ProviderError(f"docker engine does not answer: {err}") from err

    # -- reading -----------------------------------------------------------------------------

    async def _containers(self, instance_id: str) -> list[dict[str, Any]]:
        filters = json.dumps({"label": [f"ctrlmesh.instance={instance_id}"]})
        try:
            return await self.docker._query_json("containers/json", params={"all": "1", "filters": filters})
        except DockerError as err:
            raise ProviderError(f"listing containers failed: {err.message}") from err

    async def replicas(self, instance_id: str) -> list[Replica]:
        return await self._container_replicas(instance_id)

    async def _container_replicas(self, instance_id: str) -> list[Replica]:
        out = []
        for c in await self._containers(instance_id):
            labels = c.get("Labels") or {}
            ports = {
                int(p["PrivatePort"]): int(p["PublicPort"])
                for p in c.get("Ports") or []
                if p.get("PublicPort") and p.get("IP", "127.0.0.1") in ("127.0.0.1", "0.0.0.0")
            }
            out.append(
                Replica(
                    ref=c["Id"],
                    service=labels.get("ctrlmesh.service", ""),
                    release_id=labels.get("ctrlmesh.release", ""),
                    index=int(labels.get("ctrlmesh.replica", "0")),
                    state=c.get("State", ""),
                    ports=ports,
                    container_id=c["Id"],
                    started_at=datetime.fromtimestamp(c.get("Created", 0), UTC),
                    secrets=labels.get("ctrlmesh.secrets", ""),
                )
            )
        out.sort(key=lambda r: (r.service, r.release_id, r.index))
        return out

    # -- changing ----------------------------------------------------------------------------

    # -- secret files ------------------------------------------------------------------------

    def _files_dir(self, instance_id: str, container: str = "") -> Path:
        base = self._secrets_dir / instance_id
        return base / container if container else base

    def _write_files(self, group: GroupSpec, container: str) -> Path:
        """The container's secret files in a fresh directory on the tmpfs; returns it."""
        if self._url and not self._url.startswith("unix://"):
            raise ProviderError(
                "file secrets need the docker engine on this host (a unix socket); use the swarm provider"
            )
        self._secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._secrets_dir, 0o700)  # only the service's user walks in; the mount needs no path
        if not memory_backed(self._secrets_dir):
            raise ProviderError(f"{self._secrets_dir} is not a tmpfs: secret files would reach the disk")
        where = self._files_dir(group.instance_id, container)
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(mode=0o755, parents=True)
        for name, data in group.secrets.files.items():
            fd = os.open(where / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return where

    def _drop_files(self, instance_id: str, prefix: str = "") -> None:
        base = self._files_dir(instance_id)
        if not prefix:
            shutil.rmtree(base, ignore_errors=True)
            return
        if base.is_dir():
            for d in base.iterdir():
                if d.name.startswith(prefix):
                    shutil.rmtree(d, ignore_errors=True)

    def _config(self, group: GroupSpec, index: int, files: Path | None = None) -> dict[str, Any]:
        svc = group.service
        res = svc.get("resources") or {}
        exposed: dict[str, Any] = {}
        bindings: dict[str, Any] = {}
        for p in svc.get("ports") or []:
            key = f"{int(p['container_port'])}/{engine_protocol(p.get('protocol', ''))}"
            exposed[key] = {}
            bindings[key] = [{"HostIp": "127.0.0.1", "HostPort": ""}]
        memory = int(res.get("memory_mb") or 0) * 1024 * 1024
        host: dict[str, Any] = {
            "NanoCpus": int(res.get("cpu_millis") or 0) * 1_000_000,
            "Memory": memory,
            "MemorySwap": memory,  # no swap beyond the limit: the limit means what it says
            "RestartPolicy": {"Name": "unless-stopped"},
            "PortBindings": bindings,
            "Init": True,
        }
        mounts = []
        if files is not None:
            mounts.append({"Type": "bind", "Source": str(files), "Target": SECRETS_MOUNT, "ReadOnly": True})
        if self._pg_socket_dir is not None and pg_socket.wants_mount(group.secrets.env):
            # Read-write: connecting to a Unix socket is a write to it.
            mounts.append(
                {"Type": "bind", "Source": str(self._pg_socket_dir), "Target": pg_socket.CONTAINER_DIR}
            )
        if mounts:
            host["Mounts"] = mounts
        config: dict[str, Any] = {
            "Image": svc["image"],
            "Env": container_env(svc, group.secrets),
            "Labels": labels_for(group, index),
            "ExposedPorts": exposed,
            "HostConfig": host,
        }
        if svc.get("command"):
            config["Entrypoint"] = list(svc["command"])
        if svc.get("args"):
            config["Cmd"] = list(svc["args"])
        return config

    async def _create(self, group: GroupSpec, index: int) -> None:
        name = f"{group_name(group)}-{index}"
        files = self._write_files(group, name) if group.secrets.files else None
        config = self._config(group, index, files)
        try:
            container = await self.docker.containers.create(config, name=name)
        except DockerError as err:
            if err.status == 409:  # a previous attempt created it: adopt it
                container = self.docker.containers.container(name)
            elif err.status == 404 and self._pull:
                await self._pull_image(group.service["image"], group.secrets.auth_for(group.service["image"]))
                container = await self.docker.containers.create(config, name=name)
            elif err.status == 404:
                raise ImageNotFound(f"image {group.service['image']!r} is not on the engine") from err
            else:
                raise ProviderError(f"creating {name} failed: {err.message}") from err
        await self._start(container, name)

    async def _start(self, container: Any, name: str) -> None:
        """Start a container. A published port is picked by the engine from the kernel's
        ephemeral range, which outgoing connections on this host share: when the pick is taken,
        the engine answers "address already in use" and picks the next port on a second start."""
        for attempt in range(PORT_RETRIES + 1):
            try:
                await container.start()
                return
            except DockerError as err:
                if err.status == 304:  # an adopted container that already runs
                    return
                if "address already in use" not in err.message or attempt == PORT_RETRIES:
                    raise ProviderError(f"starting {name} failed: {err.message}") from err
                log.info("starting %s: its port was taken (%s); starting it again", name, err.message)

    async def _pull_image(self, image: str, auth: dict[str, str] | None = None) -> None:
        try:
            # aiodocker encodes the credentials as X-Registry-Auth; it needs a "/" in the name
            # (a bare official image is public anyway).
            await self.docker.images.pull(image, auth=dict(auth) if auth and "/" in image else None)
        except DockerError as err:
            raise ImageNotFound(f"image {image!r} could not be pulled: {err.message}") from err

    async def _remove(self, container_id: str) -> None:
        c = self.docker.containers.container(container_id)
        try:
            await c.stop(t=self._stop_timeout)
        except DockerError:
            pass  # already stopped or gone; delete below decides
        try:
            await c.delete(force=True, v=True)
        except DockerError as err:
            if err.status != 404:
                raise ProviderError(f"removing container failed: {err.message}") from err

    async def scale_group(self, group: GroupSpec, count: int) -> None:
        mine = [
            r
            for r in await self.replicas(group.instance_id)
            if r.service == group.service_name and r.release_id == group.release_id
        ]
        keep = [r for r in mine if r.index < count]
        drop = [r for r in mine if r.index >= count]
        # Highest indexes go first, as in a swarm scale-down.
        for r in sorted(drop, key=lambda r: -r.index):
            await self._remove(r.ref)
        for r in list(keep):
            if r.state not in ("created", "exited", "dead"):
                continue
            if r.secrets != group.secrets.fingerprint:
                # Started anew with the group's current secrets (a restart after a change).
                await self._remove(r.ref)
                keep.remove(r)
            else:
                await self._start(self.docker.containers.container(r.ref), r.ref)
        present = {r.index for r in keep}
        for index in range(count):
            if index not in present:
                await self._create(group, index)

    async def remove_group(self, instance_id: str, service: str, release_id: str) -> None:
        for r in await self.replicas(instance_id):
            if r.service == service and r.release_id == release_id:
                await self._remove(r.ref)
        self._drop_files(instance_id, f"cm-{instance_id}-{service}-{release_id[-8:]}-")

    async def remove_all(self, instance_id: str) -> int:
        found = await self._container_replicas(instance_id)
        await asyncio.gather(*(self._remove(r.ref) for r in found))
        self._drop_files(instance_id)
        return len(found)

    async def stop(self, instance_id: str) -> None:
        async def stop_one(ref: str) -> None:
            try:
                await self.docker.containers.container(ref).stop(t=self._stop_timeout)
            except DockerError as err:
                if err.status not in (304, 404):
                    raise ProviderError(f"stopping a replica failed: {err.message}") from err

        await asyncio.gather(*(stop_one(r.ref) for r in await self.replicas(instance_id) if r.running))

    async def update_resources(self, group: GroupSpec) -> None:
        res = group.service.get("resources") or {}
        memory = int(res.get("memory_mb") or 0) * 1024 * 1024
        body = {
            "NanoCpus": int(res.get("cpu_millis") or 0) * 1_000_000,
            "Memory": memory,
            "MemorySwap": memory,
        }
        for r in await self.replicas(group.instance_id):
            if r.service != group.service_name or r.release_id != group.release_id:
                continue
            try:
                await self.docker._query_json(f"containers/{r.ref}/update", method="POST", data=body)
            except DockerError as err:
                raise ProviderError(f"updating resources failed: {err.message}") from err

    # -- observing ---------------------------------------------------------------------------

    async def usage(self, instance_id: str) -> Usage:
        running = [r for r in await self.replicas(instance_id) if r.running and r.container_id]

        async def one(ref: str) -> dict[str, Any]:
            try:
                got = await self.docker.containers.container(ref).stats(stream=False)
            except DockerError:
                return {}
            return got[0] if got else {}

        total = Usage(containers=len(running))
        for s in await asyncio.gather(*(one(r.container_id) for r in running)):
            if not s:
                continue
            mem = s.get("memory_stats") or {}
            cache = (mem.get("stats") or {}).get("inactive_file", 0) or 0
            total.cpu_percent += cpu_percent(s)
            total.memory_used_mb += int(max(0, (mem.get("usage") or 0) - cache) / 1024 / 1024)
            total.memory_limit_mb += int((mem.get("limit") or 0) / 1024 / 1024)
            for net in (s.get("networks") or {}).values():
                total.network_in_mb += (net.get("rx_bytes") or 0) / 1024 / 1024
                total.network_out_mb += (net.get("tx_bytes") or 0) / 1024 / 1024
        total.cpu_percent = round(total.cpu_percent, 3)
        total.network_in_mb = round(total.network_in_mb, 6)
        total.network_out_mb = round(total.network_out_mb, 6)
        return total

    async def _log_list(self, r: Replica, stream: str, tail: int, since: datetime | None) -> list[LogLine]:
        params: dict[str, Any] = {stream: True, "timestamps": True, "tail": str(tail)}
        if since is not None:
            params["since"] = str(int(since.timestamp()))
        try:
            lines = await self.docker.containers.container(r.container_id).log(**params)
        except DockerError:
            return []
        out = []
        for chunk in lines:
            for raw in chunk.splitlines():
                if raw.strip():
                    ts, msg = split_log_line(raw)
                    out.append(LogLine(ts, stream, msg, r.service))
        return out

    async def logs(
        self, instance_id: str, *, tail: int, since: datetime | None, follow: bool
    ) -> AsyncIterator[LogLine]:
        reps = [r for r in await self.replicas(instance_id) if r.container_id]
        history: list[LogLine] = []
        for got in await asyncio.gather(
            *(self._log_list(r, s, tail, since) for r in reps for s in ("stdout", "stderr"))
        ):
            history.extend(got)
        history.sort(key=lambda ln: ln.timestamp)
        for line in history[-tail:] if tail else []:
            yield line
        if not follow:
            return
        queue: asyncio.Queue[LogLine] = asyncio.Queue(maxsize=1000)
        started = datetime.now(UTC)

        async def pump(r: Replica, stream: str) -> None:
            params: dict[str, Any] = {
                stream: True,
                "timestamps": True,
                "follow": True,
                "tail": "0",
                "since": str(int(started.timestamp())),
            }
            try:
                async for chunk in self.docker.containers.container(r.container_id).log(**params):
                    for raw in chunk.splitlines():
                        if raw.strip():
                            ts, msg = split_log_line(raw)
                            if queue.full():
                                queue.get_nowait()  # a slow reader loses the oldest lines
                            queue.put_nowait(LogLine(ts, stream, msg, r.service))
            except (DockerError, asyncio.CancelledError):
                pass

        tasks = [asyncio.create_task(pump(r, s)) for r in reps for s in ("stdout", "stderr")]
        try:
            while True:
                yield await queue.get()
        finally:
            for t in tasks:
                t.cancel()

    async def exec(self, container_id: str, command: list[str], limit_s: float) -> tuple[int, str]:
        async def run() -> tuple[int, str]:
            c = self.docker.containers.container(container_id)
            ex = await c.exec(command, stdout=True, stderr=True)
            chunks: list[bytes] = []
            async with ex.start(detach=False) as stream:
                while True:
                    msg = await stream.read_out()
                    if msg is None:
                        break
                    chunks.append(msg.data)
            info = await ex.inspect()
            return int(info.get("ExitCode") or 0), b"".join(chunks).decode(errors="replace")

        try:
            return await asyncio.wait_for(run(), limit_s)
        except DockerError as err:
            raise ProviderError(f"exec failed: {err.message}") from err
