"""Routes: path-based routing from the ingress to an instance's container ports, with weights.

Plain Python over the repository; no gRPC here. The instance is always read through the
instances service with the caller's own principal first, so another tenant's instance (and every
route of it) is NOT_FOUND exactly like a missing one; a route id is looked up within the
caller's scope for the same reason.

Decisions where the upstream is silent:
- `port` must be a container port of the routed service (the main service when `service_name`
  is empty); `protocol` is `http` or `grpc` (an h2c upstream). `tcp` is refused: Caddy's HTTP
  server cannot carry it.
- `hostname`, when set, must be a name of the caller's tenant: under `<tenant>.<ingress domain>`
  or one of its verified domains. Routes of different instances of one tenant with the same
  hostname and path split that traffic by weight (a canary); weight 0 takes none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from libs import ids
from libs.errors import InvalidArgument, not_found
from libs.outbox import Outbox
from libs.principal import Principal
from libs.timeutil import now
from services.network import events
from services.network import repository as repo
from services.network.ingress.inputs import IngressInputs
from services.network.peers import Accounts, Instances, LiveInstance
from services.network.repository import RouteRow, Scope

PROTOCOLS = ("http", "grpc")
DEFAULT_WEIGHT = 100


@dataclass(frozen=True)
class RouteChange:
    """The fields of a PATCH that were present."""

    service_name: str | None = None
    path: str | None = None
    port: int | None = None
    protocol: str | None = None
    weight: int | None = None
    strip_prefix: bool | None = None
    hostname: str | None = None


def _check_path(path: str) -> str:
    if not path.startswith("/") or any(c in path for c in " \t\r\n?#"):
        raise InvalidArgument("path must start with / and hold no spaces, ? or #", fields={"path": "invalid"})
    return path


def _check_protocol(protocol: str) -> str:
    protocol = protocol or "http"
    if protocol not in PROTOCOLS:
        raise InvalidArgument(
            f"protocol must be one of {', '.join(PROTOCOLS)}",
            fields={"protocol": f"{protocol!r} is not served by the ingress"},
        )
    return protocol


def _check_port(inst: LiveInstance, service_name: str, port: int) -> None:
    service = service_name or inst.main_service
    if service not in inst.service_ports:
        raise InvalidArgument(
            f"instance {inst.id!r} has no service {service_name!r}",
            fields={"service_name": "unknown service"},
        )
    allowed = inst.service_ports[service]
    if port not in allowed:
        raise InvalidArgument(
            f"port {port} is not a container port of {service!r} ({', '.join(map(str, allowed)) or 'none'})",
            fields={"port": "not one of the instance's container ports"},
        )


class RoutesDomain:
    def __init__(
        self,
        outbox: Outbox,
        instances: Instances,
        accounts: Accounts,
        inputs: Callable[[], IngressInputs],
        on_change: Callable[[str], Awaitable[None]],
        *,
        ingress_domain: str,
    ):
        self.outbox = outbox
        self.instances = instances
        self.accounts = accounts
        self._inputs = inputs
        # Called with the instance id after a committed change: the ingress refreshes that
        # instance's replicas and applies the new configuration.
        self._on_change = on_change
        self.ingress_domain = ingress_domain.lower().strip(".")

    async def _check_hostname(self, tenant_id: str, hostname: str) -> str:
        hostname = hostname.lower().rstrip(".")
        if not hostname:
            return ""
        tenant = await self.accounts.tenant(tenant_id)
        if hostname.endswith(f".{tenant.slug}.{self.ingress_domain}"):
            return hostname
        async with self.outbox.session() as s:
            hosts = await self._inputs().verified_hosts(s)
        if any(h.hostname == hostname and h.tenant_id == tenant_id for h in hosts):
            return hostname
        raise InvalidArgument(
            f"hostname must be under {tenant.slug}.{self.ingress_domain} or a verified domain of the tenant",
            fields={"hostname": "not a hostname of this tenant"},
        )

    async def create(
        self,
        p: Principal,
        instance_id: str,
        *,
        service_name: str,
        path: str,
        port: int,
        protocol: str,
        weight: int | None,
        strip_prefix: bool,
        hostname: str,
    ) -> RouteRow:
        inst = await self.instances.get(p, instance_id)
        _check_path(path)
        protocol = _check_protocol(protocol)
        _check_port(inst, service_name, port)
        hostname = await self._check_hostname(inst.tenant_id, hostname)
        tenant = await self.accounts.tenant(inst.tenant_id)
        ts = now()
        async with self.outbox.session() as s:
            row = await repo.insert_route(
                s,
                {
                    "id": ids.new_id("rte"),
                    "tenant_id": inst.tenant_id,
                    "account_id": tenant.account_id,
                    "instance_id": inst.id,
                    "service_name": service_name,
                    "path": path,
                    "port": port,
                    "protocol": protocol,
                    "weight": DEFAULT_WEIGHT if weight is None else weight,
                    "strip_prefix": strip_prefix,
                    "hostname": hostname,
                    "created_at": ts,
                    "updated_at": ts,
                },
            )
            await events.publish_route(self.outbox, s, events.ROUTE_ADDED, row)
        await self._on_change(inst.id)
        return row

    async def list(self, p: Principal, instance_id: str) -> list[RouteRow]:
        inst = await self.instances.get(p, instance_id)
        async with self.outbox.session() as s:
            return await repo.list_routes(s, inst.tenant_id, inst.id)

    async def _visible(self, p: Principal, route_id: str) -> RouteRow:
        async with self.outbox.session() as s:
            row = await repo.get_route(s, Scope.of(p), route_id)
        if row is None:
            raise not_found("route", route_id)
        return row

    async def update(self, p: Principal, route_id: str, change: RouteChange) -> RouteRow:
        row = await self._visible(p, route_id)
        values: dict[str, Any] = {}
        if change.path is not None:
            values["path"] = _check_path(change.path)
        if change.protocol is not None:
            values["protocol"] = _check_protocol(change.protocol)
        if change.weight is not None:
            values["weight"] = change.weight
        if change.strip_prefix is not None:
            values["strip_prefix"] = change.strip_prefix
        if change.service_name is not None or change.port is not None:
            inst = await self.instances.get(p, row.instance_id)
            service_name = row.service_name if change.service_name is None else change.service_name
            port = row.port if change.port is None else change.port
            _check_port(inst, service_name, port)
            values.update(service_name=service_name, port=port)
        if change.hostname is not None:
            values["hostname"] = await self._check_hostname(row.tenant_id, change.hostname)
        async with self.outbox.session() as s:
            locked = await repo.get_route(s, Scope.of(p), route_id, lock=True)
            if locked is None:
                raise not_found("route", route_id)
            if not values:
                return locked
            updated = await repo.update_route(s, route_id, {**values, "updated_at": now()})
            assert updated is not None
            await events.publish_route(self.outbox, s, events.ROUTE_UPDATED, updated, changed=sorted(values))
        await self._on_change(updated.instance_id)
        return updated

    async def delete(self, p: Principal, route_id: str) -> None:
        async with self.outbox.session() as s:
            row = await repo.get_route(s, Scope.of(p), route_id, lock=True)
            if row is None:
                raise not_found("route", route_id)
            await repo.delete_route(s, route_id)
            await events.publish_route(self.outbox, s, events.ROUTE_REMOVED, row)
        await self._on_change(row.instance_id)
