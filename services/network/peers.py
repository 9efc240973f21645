"""The network service's view of the other services: instances (read with the caller's own
principal, so another tenant's instance is NOT_FOUND exactly like a missing one; live replicas
and the event stream with this process's system principal) and accounts (a tenant's slug and
account, which name its instances' hostnames and its events)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from ctrlmesh.common.v1 import internal_pb2
from ctrlmesh.instances.v1 import instances_pb2, instances_pb2_grpc

from libs import events
from libs.peers import AccountsPeer, Peer
from libs.principal import Principal

# The instances service's events that can change where an instance answers.
INSTANCE_EVENTS = [
    "instance.created",
    "instance.state_changed",
    "instance.started",
    "instance.stopped",
    "instance.failed",
    "instance.scaled",
    "instance.deleted",
    "instance.updated",
    "instance.restarted",
    "instance.suspended",
    "instance.unsuspended",
    "deploy.started",
    "deploy.running",
    "deploy.succeeded",
    "deploy.failed",
    "deploy.cancelled",
    "deploy.rolled_back",
]


@dataclass(frozen=True)
class TenantRef:
    id: str
    slug: str
    account_id: str


@dataclass(frozen=True)
class Upstream:
    service: str
    container_port: int
    host_port: int


@dataclass(frozen=True)
class LiveInstance:
    """An instance and its running replicas' published ports, as the instances service says now."""

    id: str
    tenant_id: str
    name: str
    slug: str
    state: str
    main_service: str
    # The main service's container ports and their protocols.
    ports: tuple[tuple[int, str], ...]
    # Every service's container ports, by service name.
    service_ports: dict[str, tuple[int, ...]]
    upstreams: tuple[Upstream, ...]


def _main_service(inst: instances_pb2.Instance) -> str:
    for s in inst.services:
        if s.role in ("", "main"):
            return s.name
    return "main"


def live(inst: instances_pb2.Instance, items: list[instances_pb2.ReplicaEndpoint]) -> LiveInstance:
    return LiveInstance(
        id=inst.id,
        tenant_id=inst.tenant_id,
        name=inst.name,
        slug=inst.slug,
        state=inst.state,
        main_service=_main_service(inst),
        ports=tuple((p.container_port, p.protocol) for p in inst.ports),
        service_ports={s.name: tuple(p.container_port for p in s.ports) for s in inst.services},
        upstreams=tuple(Upstream(e.service_name, e.container_port, e.host_port) for e in items),
    )


class Instances(Peer):
    service = "instances"

    def _stub(self) -> instances_pb2_grpc.InstanceServiceStub:
        return instances_pb2_grpc.InstanceServiceStub(self.channel)

    async def get(self, caller: Principal, instance_id: str) -> LiveInstance:
        """The instance as the caller may see it (NOT_FOUND otherwise), without replicas."""
        inst = await self.call(
            self._stub().GetInstance,
            instances_pb2.GetInstanceRequest(id=instance_id),
            caller=caller,
            kind="instance",
            ident=instance_id,
        )
        return live(inst, [])

    async def replicas(self, instance_id: str) -> LiveInstance:
        """The instance with every running replica of any release (system principal)."""
        resp = await self.call(
            self._stub().ListReplicaEndpoints,
            instances_pb2.ListReplicaEndpointsRequest(id=instance_id),
            kind="instance",
            ident=instance_id,
        )
        return live(resp.instance, list(resp.items))

    async def all_ids(self) -> list[str]:
        """Every instance of every tenant (system principal), for the periodic resync."""
        out: list[str] = []
        cursor = ""
        while True:
            page = await self.call(
                self._stub().ListInstances, instances_pb2.ListInstancesRequest(cursor=cursor, limit=1000)
            )
            out.extend(i.id for i in page.items)
            if not page.next_cursor:
                return out
            cursor = page.next_cursor

    def watch(self, after: int | None) -> AsyncIterator[internal_pb2.Event]:
        """The instances service's events that can move an instance's endpoints."""
        return events.remote_source(self._channels, self._signer, "instances", types=INSTANCE_EVENTS)(after)


class Accounts(AccountsPeer):
    async def tenant(self, tenant_id: str) -> TenantRef:
        t = await self.resolve_tenant(None, tenant_id)
        return TenantRef(t.id, t.slug, t.account_id)
