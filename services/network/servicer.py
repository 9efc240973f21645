"""Transport for routes: proto ⇄ domain, nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from ctrlmesh.network.v1 import network_pb2 as pb
from ctrlmesh.network.v1 import network_pb2_grpc as rpc
from google.protobuf import empty_pb2

from libs import principal as principals
from libs.protoconv import ts
from services.network.repository import RouteRow
from services.network.routes import RouteChange, RoutesDomain


def route(r: RouteRow) -> pb.Route:
    return pb.Route(
        id=r.id,
        tenant_id=r.tenant_id,
        instance_id=r.instance_id,
        service_name=r.service_name,
        path=r.path,
        port=r.port,
        protocol=r.protocol,
        weight=r.weight,
        strip_prefix=r.strip_prefix,
        hostname=r.hostname,
        created_at=ts(r.created_at),
        updated_at=ts(r.updated_at),
    )


def _present(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


class RouteService(rpc.RouteServiceServicer):
    def __init__(self, domain: RoutesDomain):
        self.d = domain

    async def CreateRoute(
        self, request: pb.CreateRouteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Route:
        row = await self.d.create(
            principals.current(),
            request.id,
            service_name=request.service_name,
            path=request.path,
            port=request.port,
            protocol=request.protocol,
            weight=request.weight if request.HasField("weight") else None,
            strip_prefix=request.strip_prefix,
            hostname=request.hostname,
        )
        return route(row)

    async def ListRoutes(
        self, request: pb.ListRoutesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListRoutesResponse:
        rows = await self.d.list(principals.current(), request.id)
        return pb.ListRoutesResponse(items=[route(r) for r in rows], total=len(rows))

    async def UpdateRoute(
        self, request: pb.UpdateRouteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Route:
        change = RouteChange(
            **{
                f: _present(request, f)
                for f in ("service_name", "path", "port", "protocol", "weight", "strip_prefix", "hostname")
            }
        )
        return route(await self.d.update(principals.current(), request.id, change))

    async def DeleteRoute(
        self, request: pb.DeleteRouteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        await self.d.delete(principals.current(), request.id)
        return empty_pb2.Empty()


def register(server: grpc.aio.Server, routes: RoutesDomain) -> list[str]:
    rpc.add_RouteServiceServicer_to_server(RouteService(routes), server)
    return [pb.DESCRIPTOR.services_by_name["RouteService"].full_name]
