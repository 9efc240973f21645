"""Transport for secrets: proto ⇄ domain, nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from ctrlmesh.network.v1 import network_pb2 as pb
from ctrlmesh.network.v1 import network_pb2_grpc as rpc
from google.protobuf import empty_pb2

from libs import principal as principals
from libs.protoconv import ts
from services.network.secrets.domain import SecretsDomain
from services.network.secrets.repository import SecretRow


def secret(row: SecretRow, deployment_id: str = "") -> pb.Secret:
    return pb.Secret(
        id=row.id,
        tenant_id=row.tenant_id,
        instance_id=row.instance_id,
        key=row.key,
        type=row.type,
        version=row.version,
        created_at=ts(row.created_at),
        updated_at=ts(row.updated_at),
        deployment_id=deployment_id,
    )


class SecretService(rpc.SecretServiceServicer):
    def __init__(self, domain: SecretsDomain):
        self.d = domain

    async def SetSecret(
        self, request: pb.SetSecretRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Secret:
        body = request.secret
        row, deployment = await self.d.set(
            principals.current(), request.id, body.key, body.value, body.type, rollout=request.rollout
        )
        return secret(row, deployment)

    async def ListSecrets(
        self, request: pb.ListSecretsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSecretsResponse:
        rows = await self.d.list_for(principals.current(), request.id)
        return pb.ListSecretsResponse(items=[secret(r) for r in rows], total=len(rows))

    async def DeleteSecret(
        self, request: pb.DeleteSecretRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.delete(principals.current(), request.id, request.key, rollout=request.rollout)
        return empty_pb2.Empty()

    async def ResolveSecrets(
        self, request: pb.ResolveSecretsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ResolveSecretsResponse:
        found, missing = await self.d.resolve(
            principals.current(), request.tenant_id, request.instance_id, dict(request.versions), request.type
        )
        return pb.ResolveSecretsResponse(
            secrets=[
                pb.ResolvedSecret(id=r.id, key=r.key, type=r.type, version=r.version, value=r.value)
                for r in found
            ],
            missing=missing,
        )


def register(server: grpc.aio.Server, domain: SecretsDomain) -> list[str]:
    rpc.add_SecretServiceServicer_to_server(SecretService(domain), server)
    return [pb.DESCRIPTOR.services_by_name["SecretService"].full_name]
