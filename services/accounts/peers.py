"""Accounts' view of the other services: counting, purging and summarising a tenant's resources
through the shared internal TenantResourcesService contract, never through their tables."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from ctrlmesh.common.v1 import internal_pb2, internal_pb2_grpc

from libs import events
from libs.clients import Channels, Signer
from libs.peers import Peer

# The services that own tenant resources (accounts counts its own; clusters: managed databases).
OWNERS = ("databases", "instances", "network", "clusters")


class Owner(Peer):
    """One owning service's TenantResourcesService (system principal)."""

    def stub(self) -> internal_pb2_grpc.TenantResourcesServiceStub:
        return internal_pb2_grpc.TenantResourcesServiceStub(self.channel)


class Peers:
    def __init__(self, channels: Channels, signer: Signer, timeout: float = 5.0):
        self._channels = channels
        self._signer = signer
        self._owners = {s: Owner(channels, signer, timeout, service=s) for s in OWNERS}

    async def _call(self, service: str, method: str, request: Any) -> Any:
        owner = self._owners[service]
        return await owner.call(getattr(owner.stub(), method), request)

    async def count(
        self, tenant_ids: list[str], owners: tuple[str, ...] = OWNERS
    ) -> dict[str, dict[str, int]]:
        """Per tenant, the merged counts of the owning services (every one unless named)."""
        if not tenant_ids:
            return {}
        req = internal_pb2.CountTenantResourcesRequest(tenant_ids=tenant_ids)
        answers = await asyncio.gather(*(self._call(s, "CountTenantResources", req) for s in owners))
        merged: dict[str, dict[str, int]] = defaultdict(dict)
        for answer in answers:
            for tid, rc in answer.tenants.items():
                for k, v in rc.counts.items():
                    merged[tid][k] = merged[tid].get(k, 0) + v
        return dict(merged)

    async def purge(self, tenant_id: str) -> bool:
        req = internal_pb2.PurgeTenantRequest(tenant_id=tenant_id)
        answers = await asyncio.gather(*(self._call(s, "PurgeTenant", req) for s in OWNERS))
        return all(a.done for a in answers)

    def event_source(
        self, service: str, types: list[str], *, account_id: str = "", tenant_id: str = ""
    ) -> events.Source:
        """Another service's event stream, filtered to a visibility (for /v2/events)."""
        return events.remote_source(
            self._channels, self._signer, service, types=types, account_id=account_id, tenant_id=tenant_id
        )

    async def stats(self) -> dict[str, int]:
        req = internal_pb2.GetResourceStatsRequest()
        answers = await asyncio.gather(*(self._call(s, "GetResourceStats", req) for s in OWNERS))
        merged: dict[str, int] = {}
        for a in answers:
            for k, v in a.counts.items():
                merged[k] = merged.get(k, 0) + v
        return merged
