"""The domains' view of other services: the instance a domain is for (instances) and its
tenant's account, status and `max_domains` (accounts). Calls carry the caller's principal, so
another tenant's instance answers NOT_FOUND exactly like a missing one."""

from __future__ import annotations

from dataclasses import dataclass

from ctrlmesh.instances.v1 import instances_pb2, instances_pb2_grpc

from libs.peers import AccountsPeer, Peer
from libs.principal import Principal


@dataclass(frozen=True)
class InstanceRef:
    id: str
    tenant_id: str
    name: str


@dataclass(frozen=True)
class TenantLimits:
    tenant_id: str
    account_id: str
    status: str
    max_domains: int


class Instances(Peer):
    service = "instances"

    async def get(self, p: Principal, instance_id: str) -> InstanceRef:
        stub = instances_pb2_grpc.InstanceServiceStub(self.channel)
        inst = await self.call(
            stub.GetInstance,
            instances_pb2.GetInstanceRequest(id=instance_id),
            caller=p,
            kind="instance",
            ident=instance_id,
        )
        return InstanceRef(inst.id, inst.tenant_id, inst.name)


class Accounts(AccountsPeer):
    async def limits(self, p: Principal | None, tenant_id: str) -> TenantLimits:
        """As visible to `p` (None: this service's system principal)."""
        tenant, lim = await self.tenant_and_limits(p, tenant_id)
        return TenantLimits(tenant.id, tenant.account_id, lim.status, lim.quota.max_domains)
