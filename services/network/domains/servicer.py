"""Transport for domains and certificates: proto ⇄ domain, nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from ctrlmesh.network.v1 import network_pb2 as pb
from ctrlmesh.network.v1 import network_pb2_grpc as rpc
from google.protobuf import empty_pb2

from libs import principal as principals
from libs.protoconv import ts
from services.network.domains.domain import Domains, DomainView
from services.network.domains.hostnames import txt_record
from services.network.domains.repository import CertRow


def domain(view: DomainView, dns_target: str) -> pb.Domain:
    d = view.domain
    msg = pb.Domain(
        id=d.id,
        tenant_id=d.tenant_id,
        instance_id=d.instance_id,
        hostname=d.hostname,
        verified=d.verified,
        verify_token=d.verify_token,
        dns_target=dns_target,
        tls_enabled=d.tls_enabled,
        cert_expiry=ts(d.cert_expiry),
        created_at=ts(d.created_at),
        updated_at=ts(d.updated_at),
        txt_record=txt_record(d.hostname),
        verified_at=ts(d.verified_at),
        next_check_at=ts(d.next_check_at),
        last_check_error=d.last_check_error,
    )
    if view.cert is not None:
        msg.certificate.CopyFrom(certificate(view.cert))
    return msg


def certificate(c: CertRow) -> pb.Certificate:
    return pb.Certificate(
        id=c.id,
        domain_id=c.domain_id,
        tenant_id=c.tenant_id,
        hostname=c.hostname,
        issuer=c.issuer,
        not_before=ts(c.not_before),
        expires_at=ts(c.expires_at),
        auto_renew=c.auto_renew,
        status=c.state,
        created_at=ts(c.created_at),
        updated_at=ts(c.updated_at),
        last_error=c.last_error,
        attempts=c.attempts,
        next_attempt_at=ts(c.next_attempt_at),
        serial=c.serial,
        renewed_at=ts(c.renewed_at),
    )


class DomainService(rpc.DomainServiceServicer):
    def __init__(self, domains: Domains):
        self.d = domains

    async def CreateDomain(
        self, request: pb.CreateDomainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Domain:
        row = await self.d.create(
            principals.current(), request.id, request.hostname, auto_tls=request.tls_enabled
        )
        return domain(row, self.d.dns_target)

    async def ListDomains(
        self, request: pb.ListDomainsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListDomainsResponse:
        rows = await self.d.list(principals.current(), request.id)
        return pb.ListDomainsResponse(items=[domain(r, self.d.dns_target) for r in rows], total=len(rows))

    async def VerifyDomain(
        self, request: pb.VerifyDomainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Domain:
        return domain(await self.d.verify(principals.current(), request.id), self.d.dns_target)

    async def ProvisionCertificate(
        self, request: pb.ProvisionCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Certificate:
        auto_renew = request.auto_renew if request.HasField("auto_renew") else True
        return certificate(await self.d.provision(principals.current(), request.id, auto_renew=auto_renew))

    async def DeleteDomain(
        self, request: pb.DeleteDomainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.delete(principals.current(), request.id)
        return empty_pb2.Empty()


def register(server: grpc.aio.Server, domains: Domains) -> str:
    rpc.add_DomainServiceServicer_to_server(DomainService(domains), server)
    return str(pb.DESCRIPTOR.services_by_name["DomainService"].full_name)
