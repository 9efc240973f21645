"""Health checks that run: the checkers (http, tcp, grpc, command), the runner that executes each
enabled check on its interval, the aggregate, and the fan-out to SSE watchers.

A target on `localhost` names the instance itself: `http://localhost:8080/healthz` is sent to the
host port where container port 8080 of a running replica is published; a `command` runs inside
that replica's container. A check's effective status turns `unhealthy` only after `retries`
consecutive failures (Docker's HEALTHCHECK meaning), and health transitions of the instance are
written to the outbox as `health.passed|failed|degraded|recovered`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs import ids
from libs.db import Database
from libs.errors import InvalidArgument, not_found
from libs.outbox import Outbox
from libs.principal import Principal
from libs.reconcile import every
from services.instances import repository as repo
from services.instances import specs
from services.instances.domain import InstancesDomain
from services.instances.metrics import HEALTH_CHECKS
from services.instances.providers import Registry
from services.instances.providers.base import Provider, ProviderError, Replica
from services.instances.repository import HealthCheck, HealthResult, Instance, Scope, now

log = logging.getLogger("ctrlmesh.instances.health")

LOCAL_HOSTS = ("localhost",)
DEFAULT_INTERVAL_S = 30.0
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 3


@dataclass
class Outcome:
    status: str  # "healthy" or "unhealthy"
    latency_ms: float
    message: str = ""
    status_code: int = 0


# -- targets ----------------------------------------------------------------------------------


def _host_port(target: str) -> tuple[str, int, str]:
    """`host:port[/grpc.service]` → (host, port, rest)."""
    hostport, _, rest = target.partition("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port")
    return host.strip("[]"), int(port), rest


def validate_target(kind: str, target: str, container_ports: set[int]) -> None:
    """Reject targets that can never work, and localhost ports the instance does not have."""
    try:
        if kind == "http":
            u = urlsplit(target)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError("expected an http(s) URL")
            host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
        elif kind in ("tcp", "grpc"):
            host, port, _ = _host_port(target)
        else:
            if not target.strip():
                raise ValueError("expected a command")
            return
    except ValueError as err:
        raise InvalidArgument(f"invalid {kind} target: {err}", fields={"target": str(err)}) from None
    if host in LOCAL_HOSTS and port not in container_ports:
        raise InvalidArgument(
            f"localhost:{port} is not a port of the instance (its ports: {sorted(container_ports) or 'none'})",
            fields={"target": "localhost targets must name one of the instance's container ports"},
        )


def _map_local(host: str, port: int, replica: Replica | None) -> tuple[str, int]:
    if host not in LOCAL_HOSTS:
        return host, port
    if replica is None:
        raise LookupError("the instance has no running replica")
    published = replica.ports.get(port)
    if not published:
        raise LookupError(f"container port {port} is not published")
    return "127.0.0.1", published


# -- checkers ---------------------------------------------------------------------------------


async def _http(target: str, limit_s: float, replica: Replica | None) -> Outcome:
    u = urlsplit(target)
    host, port = _map_local(u.hostname or "", u.port or (443 if u.scheme == "https" else 80), replica)
    url = urlunsplit((u.scheme, f"{host}:{port}", u.path or "/", u.query, ""))
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=limit_s, follow_redirects=False) as client:
        r = await client.get(url)
    ms = (time.perf_counter() - started) * 1000
    if 200 <= r.status_code < 400:
        return Outcome("healthy", ms, f"HTTP {r.status_code}", r.status_code)
    return Outcome("unhealthy", ms, f"unexpected status code: {r.status_code}", r.status_code)


async def _tcp(target: str, limit_s: float, replica: Replica | None) -> Outcome:
    host, port, _ = _host_port(target)
    host, port = _map_local(host, port, replica)
    started = time.perf_counter()
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), limit_s)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return Outcome("healthy", (time.perf_counter() - started) * 1000, "connected")


async def _grpc(target: str, limit_s: float, replica: Replica | None) -> Outcome:
    host, port, service = _host_port(target)
    host, port = _map_local(host, port, replica)
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(f"{host}:{port}") as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=limit_s
        )
    ms = (time.perf_counter() - started) * 1000
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    return Outcome("healthy" if r.status == health_pb2.HealthCheckResponse.SERVING else "unhealthy", ms, name)


async def _command(target: str, limit_s: float, replica: Replica | None, provider: Provider) -> Outcome:
    if replica is None or not replica.container_id:
        raise LookupError("the instance has no running replica")
    started = time.perf_counter()
    code, output = await provider.exec(replica.container_id, ["/bin/sh", "-c", target], limit_s)
    ms = (time.perf_counter() - started) * 1000
    tail = output.strip()[-200:]
    if code == 0:
        return Outcome("healthy", ms, tail or "exit 0")
    return Outcome("unhealthy", ms, f"exit {code}: {tail}" if tail else f"exit {code}")


async def execute(check: HealthCheck, replica: Replica | None, provider: Provider | None) -> Outcome:
    """Run one check once against one replica; every failure is an unhealthy outcome."""
    timeout = float(check.timeout_s)
    started = time.perf_counter()
    try:
        if check.type == "http":
            return await _http(check.target, timeout, replica)
        if check.type == "tcp":
            return await _tcp(check.target, timeout, replica)
        if check.type == "grpc":
            return await _grpc(check.target, timeout, replica)
        if provider is None:
            raise LookupError("the instance's provider is not available")
        return await _command(check.target, timeout, replica, provider)
    except (TimeoutError, httpx.TimeoutException):
        return Outcome("unhealthy", (time.perf_counter() - started) * 1000, f"timed out after {timeout:g}s")
    except grpc.aio.AioRpcError as err:
        return Outcome("unhealthy", (time.perf_counter() - started) * 1000, f"grpc {err.code().name}")
    except (OSError, httpx.HTTPError, LookupError, ProviderError, ValueError) as err:
        return Outcome("unhealthy", (time.perf_counter() - started) * 1000, str(err) or type(err).__name__)


async def serving_replica(provider: Provider, instance: Instance) -> Replica | None:
    """The replica checks go to: the main service's first running replica of the current release."""
    main = specs.main_service(instance.spec["services"])["name"]
    reps = [r for r in await provider.replicas(instance.id) if r.running and r.service == main]
    current = [r for r in reps if r.release_id == instance.current_release]
    pool = current or reps
    return min(pool, key=lambda r: r.index) if pool else None


# -- aggregate --------------------------------------------------------------------------------


def aggregate(statuses: list[str]) -> str:
    if not statuses or all(st == "unknown" for st in statuses):
        return "unknown"
    if all(st == "healthy" for st in statuses):
        return "healthy"
    if all(st == "unhealthy" for st in statuses):
        return "unhealthy"
    return "degraded"


def transition_event(previous: str, current: str) -> str | None:
    if previous == current:
        return None
    if current == "healthy":
        return "health.passed" if previous == "unknown" else "health.recovered"
    if current == "unhealthy":
        return "health.failed"
    if current == "degraded":
        return "health.degraded"
    return None


class Hub:
    """In-process fan-out of new results to watchers; a slow watcher loses results, never blocks."""

    def __init__(self, buffer: int = 16):
        self._subs: dict[str, set[asyncio.Queue[HealthResult]]] = defaultdict(set)
        self._buffer = buffer

    def publish(self, instance_id: str, result: HealthResult) -> None:
        for q in list(self._subs.get(instance_id, ())):
            if q.full():
                continue
            q.put_nowait(result)

    async def subscribe(self, instance_id: str) -> AsyncIterator[HealthResult]:
        q: asyncio.Queue[HealthResult] = asyncio.Queue(self._buffer)
        self._subs[instance_id].add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subs[instance_id].discard(q)
            if not self._subs[instance_id]:
                self._subs.pop(instance_id, None)


@dataclass
class InstanceHealth:
    instance_id: str
    status: str
    checks: list[tuple[HealthCheck, HealthResult | None]]
    last_checked: Any
    uptime_percent: float
    consecutive_failures: int


class HealthDomain:
    def __init__(
        self, db: Database, instances: InstancesDomain, registry: Registry, outbox: Outbox, hub: Hub
    ):
        self.db = db
        self.instances = instances
        self.registry = registry
        self.outbox = outbox
        self.hub = hub

    async def create(
        self,
        p: Principal,
        instance_id: str,
        *,
        name: str,
        type_: str,
        target: str,
        interval_s: float | None,
        timeout_s: float | None,
        retries: int | None,
        enabled: bool | None,
    ) -> HealthCheck:
        """A check; what the caller leaves out takes the upstream defaults: every 30 s, a timeout
        of 5 s (at most the interval), 3 retries, enabled."""
        interval_s = DEFAULT_INTERVAL_S if interval_s is None else interval_s
        timeout_s = min(DEFAULT_TIMEOUT_S, interval_s) if timeout_s is None else timeout_s
        retries = DEFAULT_RETRIES if retries is None else retries
        enabled = True if enabled is None else enabled
        inst = await self.instances.get(p, instance_id)
        await self.instances.writable(p, inst.tenant_id)
        ports = {pt["container_port"] for svc in inst.spec["services"] for pt in svc["ports"]}
        validate_target(type_, target, ports)
        if timeout_s > interval_s:
            raise InvalidArgument(
                "timeout must not exceed interval", fields={"timeout": "at most the interval"}
            )
        t = now()
        values = {
            "id": ids.new_id("chk"),
            "tenant_id": inst.tenant_id,
            "instance_id": instance_id,
            "name": name,
            "type": type_,
            "target": target,
            "interval_s": interval_s,
            "timeout_s": timeout_s,
            "retries": retries,
            "enabled": enabled,
            "status": "unknown",
            "consecutive_failures": 0,
            "created_at": t,
            "updated_at": t,
        }
        async with self.outbox.session() as s:
            row = await repo.insert_check(s, values)
            await self.outbox.publish(
                s,
                "health.check_created",
                resource="health_check",
                resource_id=row.id,
                tenant_id=row.tenant_id,
                account_id=repo.account_of(instance_id),
                data={"id": row.id, "instance_id": instance_id},
            )
        return row

    async def list_checks(self, p: Principal, instance_id: str) -> list[HealthCheck]:
        await self.instances.get(p, instance_id)
        async with self.db.session() as s:
            return await repo.list_checks(s, Scope.of(p), instance_id)

    async def _check(self, p: Principal, check_id: str) -> HealthCheck:
        async with self.db.session() as s:
            row = await repo.get_check(s, Scope.of(p), check_id)
        if row is None:
            raise not_found("health_check", check_id)
        return row

    async def delete(self, p: Principal, check_id: str) -> None:
        check = await self._check(p, check_id)
        await self.instances.writable(p, check.tenant_id)
        async with self.outbox.session() as s:
            await repo.delete_check(s, Scope.of(p), check_id)
            await self._refresh_aggregate(s, check.instance_id, check.tenant_id)

    async def run_now(self, p: Principal, check_id: str) -> HealthResult:
        return await self.run(await self._check(p, check_id))

    async def run(self, check: HealthCheck) -> HealthResult:
        """Execute a check against the instance and record the result."""
        async with self.db.session() as s:
            inst = await repo.get_instance(s, Scope.tenant(check.tenant_id), check.instance_id)
        if inst is None:
            raise not_found("instance", check.instance_id)
        provider = (
            self.registry.get(inst.provider_name, inst.cluster_id)
            if self.registry.has(inst.provider_name, inst.cluster_id)
            else None
        )
        if inst.state != "running":
            outcome = Outcome("unhealthy", 0.0, f"instance is {inst.state}")
        else:
            try:
                replica = await serving_replica(provider, inst) if provider is not None else None
            except ProviderError as err:
                replica = None
                log.info("could not list replicas of %s: %s", inst.id, err)
            outcome = await execute(check, replica, provider)
        return await self.record(check, outcome)

    async def record(self, check: HealthCheck, outcome: Outcome) -> HealthResult:
        HEALTH_CHECKS.labels(outcome.status).inc()
        result = HealthResult(
            id=ids.new_id("hres"),
            tenant_id=check.tenant_id,
            check_id=check.id,
            instance_id=check.instance_id,
            status=outcome.status,
            latency_ms=round(outcome.latency_ms, 3),
            message=outcome.message[:2000],
            status_code=outcome.status_code,
            checked_at=now(),
        )
        async with self.outbox.session() as s:
            current = await repo.get_check(s, Scope.tenant(check.tenant_id), check.id)
            if current is None:  # deleted meanwhile
                return result
            await repo.insert_result(s, result)
            failures = 0 if outcome.status == "healthy" else current.consecutive_failures + 1
            if outcome.status == "healthy":
                status = "healthy"
            elif failures >= max(1, current.retries):
                status = "unhealthy"
            else:
                status = current.status  # within its retries: keep what it was
            await repo.update_check(
                s,
                Scope.tenant(check.tenant_id),
                check.id,
                {"consecutive_failures": failures, "status": status},
            )
            await self._refresh_aggregate(s, check.instance_id, check.tenant_id, cause=check.id)
        self.hub.publish(check.instance_id, result)
        return result

    async def _refresh_aggregate(self, s: Any, instance_id: str, tenant_id: str, cause: str = "") -> None:
        checks = await repo.list_checks(s, Scope.tenant(tenant_id), instance_id)
        status = aggregate([c.status for c in checks if c.enabled])
        previous = await repo.swap_instance_health(s, instance_id, tenant_id, status)
        event = transition_event(previous, status)
        if event:
            await self.outbox.publish(
                s,
                event,
                resource="instance",
                resource_id=instance_id,
                tenant_id=tenant_id,
                account_id=repo.account_of(instance_id),
                data={"instance_id": instance_id, "status": status, "previous": previous, "check_id": cause},
            )

    async def instance_health(self, p: Principal, instance_id: str) -> InstanceHealth:
        await self.instances.get(p, instance_id)
        async with self.db.session() as s:
            checks = await repo.list_checks(s, Scope.of(p), instance_id)
            latest = await repo.latest_results(s, Scope.of(p), [c.id for c in checks])
            recent = await repo.recent_results(s, Scope.of(p), instance_id, now() - timedelta(hours=24))
        status = aggregate([c.status for c in checks if c.enabled])
        uptime = round(100.0 * sum(r.status == "healthy" for r in recent) / len(recent), 2) if recent else 0.0
        streak = 0
        for r in recent:  # newest first
            if r.status == "healthy":
                break
            streak += 1
        last = max((r.checked_at for r in latest.values()), default=None)
        return InstanceHealth(
            instance_id, status, [(c, latest.get(c.id)) for c in checks], last, uptime, streak
        )

    async def watch(self, p: Principal, instance_id: str) -> AsyncIterator[HealthResult]:
        await self.instances.get(p, instance_id)
        async for result in self.hub.subscribe(instance_id):
            yield result


class Runner:
    """Runs every enabled check of running instances on its own interval."""

    def __init__(self, health: HealthDomain, db: Database, tick: float = 0.25, concurrency: int = 16):
        self.health = health
        self.db = db
        self.tick = tick
        self._next: dict[str, float] = {}
        self._busy: set[str] = set()
        self._sem = asyncio.Semaphore(concurrency)
        self._last_prune = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    async def _one(self, check: HealthCheck) -> None:
        async with self._sem:
            try:
                await self.health.run(check)
            except Exception:
                log.warning("health check %s failed to run", check.id, exc_info=True)
            finally:
                self._busy.discard(check.id)

    async def run(self) -> None:
        await every("health runner", self.tick, self._pass, first=0, jitter=0)

    async def _pass(self) -> None:
        async with self.db.session() as s:
            checks = await repo.enabled_checks(s)
            if time.monotonic() - self._last_prune > 600:
                await repo.prune_results(s, timedelta(hours=25))
                self._last_prune = time.monotonic()
        t = time.monotonic()
        live = {c.id for c in checks}
        for cid in list(self._next):
            if cid not in live:
                self._next.pop(cid, None)
        for c in checks:
            due = self._next.setdefault(c.id, t)
            if due <= t and c.id not in self._busy:
                self._busy.add(c.id)
                self._next[c.id] = t + float(c.interval_s)
                task = asyncio.create_task(self._one(c))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
