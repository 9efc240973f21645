"""The clusters service's view of the other services, through their gRPC APIs (never their
tables). Calls made for a caller carry the caller's own principal (re-signed), so each service
applies the caller's visibility and permissions: another tenant's instance or database answers
NOT_FOUND exactly like a missing one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ctrlmesh.accounts.v1 import accounts_pb2
from ctrlmesh.common.v1 import internal_pb2, internal_pb2_grpc
from ctrlmesh.databases.v1 import databases_pb2, databases_pb2_grpc
from ctrlmesh.instances.v1 import instances_pb2, instances_pb2_grpc

from libs import events
from libs.peers import AccountsPeer, Peer
from libs.principal import Principal


class Accounts(AccountsPeer):
    async def tenants(self, caller: Principal) -> list[accounts_pb2.Tenant]:
        out: list[accounts_pb2.Tenant] = []
        while True:
            page = await self.call(
                self.tenants_stub().ListTenants,
                accounts_pb2.ListTenantsRequest(limit=1000, offset=len(out)),
                caller=caller,
            )
            out.extend(page.items)
            if not page.items or len(out) >= page.total:
                return out

    def watch(self, types: list[str], after: int | None) -> AsyncIterator[internal_pb2.Event]:
        """accounts' own event stream (every tenant), from after `after` or from now (then led by
        a `stream.head` event)."""
        return events.remote_source(self._channels, self._signer, "accounts", types=types)(after)

    async def credentials(self, tenant_id: str) -> accounts_pb2.TenantCredentials:
        """The tenant's PostgreSQL credentials (system principal: only a bind asks)."""
        return await self.call(
            self.tenants_stub().GetTenantCredentials,
            accounts_pb2.GetTenantCredentialsRequest(tenant=tenant_id),
            kind="tenant",
            ident=tenant_id,
        )


class Databases(Peer):
    service = "databases"

    def _stub(self) -> databases_pb2_grpc.DatabaseServiceStub:
        return databases_pb2_grpc.DatabaseServiceStub(self.channel)

    async def create(self, caller: Principal, tenant_id: str, name: str) -> databases_pb2.Database:
        return await self.call(
            self._stub().CreateDatabase,
            databases_pb2.CreateDatabaseRequest(tenant=tenant_id, name=name, size="L1"),
            caller=caller,
        )

    async def get(self, db_id: str) -> databases_pb2.Database | None:
        """The backing database as it is now; None once it is gone."""
        from libs.errors import NotFound

        try:
            return await self.call(
                self._stub().GetDatabaseById, databases_pb2.GetDatabaseByIdRequest(db_id=db_id)
            )
        except NotFound:
            return None

    async def get_named(self, tenant_id: str, name: str) -> databases_pb2.Database | None:
        """The tenant's database of that name; None if there is none."""
        from libs.errors import NotFound

        try:
            return await self.call(
                self._stub().GetDatabase, databases_pb2.GetDatabaseRequest(tenant=tenant_id, db=name)
            )
        except NotFound:
            return None

    async def delete(self, tenant_id: str, name: str) -> None:
        from libs.errors import NotFound

        try:
            await self.call(
                self._stub().DeleteDatabase,
                databases_pb2.DeleteDatabaseRequest(tenant=tenant_id, db=name, force=True),
            )
        except NotFound:
            pass

    async def count(self, caller: Principal, tenant_id: str) -> int:
        page = await self.call(
            self._stub().ListDatabases,
            databases_pb2.ListDatabasesRequest(tenant=tenant_id, limit=1),
            caller=caller,
        )
        return int(page.total)


class Instances(Peer):
    service = "instances"

    def _inst(self) -> instances_pb2_grpc.InstanceServiceStub:
        return instances_pb2_grpc.InstanceServiceStub(self.channel)

    def _deps(self) -> instances_pb2_grpc.DeploymentServiceStub:
        return instances_pb2_grpc.DeploymentServiceStub(self.channel)

    async def create(
        self, caller: Principal, req: instances_pb2.CreateInstanceRequest
    ) -> instances_pb2.Instance:
        return await self.call(self._inst().CreateInstance, req, caller=caller)

    async def get(self, caller: Principal, instance_id: str) -> instances_pb2.Instance:
        return await self.call(
            self._inst().GetInstance,
            instances_pb2.GetInstanceRequest(id=instance_id),
            caller=caller,
            kind="instance",
            ident=instance_id,
        )

    async def delete(self, caller: Principal, instance_id: str) -> None:
        from libs.errors import NotFound

        try:
            await self.call(
                self._inst().DeleteInstance,
                instances_pb2.DeleteInstanceRequest(id=instance_id),
                caller=caller,
            )
        except NotFound:
            pass

    async def restart(self, caller: Principal, instance_id: str) -> None:
        await self.call(
            self._inst().RestartInstance, instances_pb2.RestartInstanceRequest(id=instance_id), caller=caller
        )

    async def deploy(self, caller: Principal, req: instances_pb2.DeployRequest) -> instances_pb2.Deployment:
        return await self.call(self._deps().Deploy, req, caller=caller)

    async def all(self, caller: Principal) -> list[instances_pb2.Instance]:
        out: list[instances_pb2.Instance] = []
        cursor = ""
        while True:
            page = await self.call(
                self._inst().ListInstances,
                instances_pb2.ListInstancesRequest(limit=1000, cursor=cursor),
                caller=caller,
            )
            out.extend(page.items)
            cursor = page.next_cursor
            if not cursor:
                return out

    async def deployment_count(self, caller: Principal, instance_ids: list[str]) -> int:
        async def one(i: str) -> int:
            page = await self.call(
                self._deps().ListDeployments,
                instances_pb2.ListDeploymentsRequest(id=i, limit=1),
                caller=caller,
            )
            return int(page.total)

        return sum(await asyncio.gather(*(one(i) for i in instance_ids)))


class Resources(Peer):
    """Another service's internal TenantResourcesService (platform-wide totals)."""

    async def stats(self) -> dict[str, Any]:
        stub = internal_pb2_grpc.TenantResourcesServiceStub(self.channel)
        resp = await self.call(stub.GetResourceStats, internal_pb2.GetResourceStatsRequest())
        return dict(resp.counts)


class Secrets(Peer):
    """The network service's SecretService: where a binding writes an app's connection."""

    service = "network"

    def _stub(self) -> Any:
        from ctrlmesh.network.v1 import network_pb2_grpc

        return network_pb2_grpc.SecretServiceStub(self.channel)

    async def set(
        self, caller: Principal, app_id: str, key: str, value: str, type_: str, *, rollout: bool
    ) -> None:
        from ctrlmesh.network.v1 import network_pb2

        await self.call(
            self._stub().SetSecret,
            network_pb2.SetSecretRequest(
                id=app_id, secret=network_pb2.SecretInput(key=key, value=value, type=type_), rollout=rollout
            ),
            caller=caller,
            kind="instance",
            ident=app_id,
        )

    async def delete(self, caller: Principal, app_id: str, key: str) -> None:
        from ctrlmesh.network.v1 import network_pb2

        from libs.errors import NotFound

        try:
            await self.call(
                self._stub().DeleteSecret, network_pb2.DeleteSecretRequest(id=app_id, key=key), caller=caller
            )
        except NotFound:
            pass
