"""The secrets domain's view of the other services: the instance a secret belongs to (through the
instances service, with the caller's own principal, so another tenant's instance is NOT_FOUND),
the tenant's quota and account (accounts), and the rolling deploy `?rollout=true` starts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from ctrlmesh.common.v1 import internal_pb2
from ctrlmesh.instances.v1 import instances_pb2, instances_pb2_grpc

from libs import events
from libs.errors import NotFound
from libs.peers import AccountsPeer, Peer
from libs.principal import Principal


@dataclass(frozen=True)
class Owner:
    """The instance a secret belongs to, with what the secrets domain needs of its tenant."""

    instance_id: str
    tenant_id: str
    account_id: str
    tenant_status: str
    # 0 = no cap.
    max_secrets: int
    image: str


class Instances(Peer):
    service = "instances"

    async def get(self, caller: Principal, instance_id: str) -> instances_pb2.Instance:
        return await self.call(
            instances_pb2_grpc.InstanceServiceStub(self.channel).GetInstance,
            instances_pb2.GetInstanceRequest(id=instance_id),
            caller=caller,
            kind="instance",
            ident=instance_id,
        )

    async def rollout(self, caller: Principal, instance_id: str, image: str, notes: str) -> str:
        """Start a rolling deploy of the instance as it is (same image): its new release picks up
        the current secret versions. Returns the deployment id."""
        dep = await self.call(
            instances_pb2_grpc.DeploymentServiceStub(self.channel).Deploy,
            instances_pb2.DeployRequest(id=instance_id, image=image, strategy="rolling", notes=notes),
            caller=caller,
            kind="instance",
            ident=instance_id,
        )
        return str(dep.id)

    async def exists(self, instance_id: str) -> bool:
        """Whether the instances service still holds the instance (asked as this service)."""
        try:
            await self.call(
                instances_pb2_grpc.InstanceServiceStub(self.channel).GetInstance,
                instances_pb2.GetInstanceRequest(id=instance_id),
            )
        except NotFound:
            return False
        return True

    def deletions(self) -> AsyncIterator[internal_pb2.Event]:
        """The instances service's `instance.deleted` events from now on."""
        return events.remote_source(self._channels, self._signer, "instances", types=["instance.deleted"])(
            None
        )


class Accounts(AccountsPeer):
    async def tenant(self, caller: Principal, tenant_id: str) -> tuple[str, str, int]:
        """(account id, status, max_secrets) of the tenant, as visible to the caller."""
        tenant, lim = await self.tenant_and_limits(caller, tenant_id)
        return tenant.account_id, lim.status, lim.quota.max_secrets


class Peers:
    def __init__(self, instances: Instances, accounts: Accounts):
        self.instances = instances
        self.accounts = accounts

    async def owner(self, caller: Principal, instance_id: str) -> Owner:
        """The caller's instance (NotFound for another tenant's, exactly like a missing one)."""
        inst = await self.instances.get(caller, instance_id)
        account_id, status, max_secrets = await self.accounts.tenant(caller, inst.tenant_id)
        return Owner(inst.id, inst.tenant_id, account_id, status, max_secrets, inst.image)
